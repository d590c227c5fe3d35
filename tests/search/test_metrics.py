import pytest

from miles_envs.search.metrics import exact_match, f1_score, normalize_answer


def test_normalisation_drops_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"


def test_exact_match_takes_the_best_alias():
    assert exact_match("the Big Apple", ["New York City", "Big Apple"]) == 1.0
    assert exact_match("New York", ["New York City"]) == 0.0


def test_f1_is_token_overlap():
    assert f1_score("New York", ["New York City"]) == pytest.approx(0.8)
    assert f1_score("Boston", ["New York City", "NYC"]) == 0.0
    assert f1_score("a", ["the"]) == 0.0
