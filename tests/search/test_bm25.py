"""BM25 build and query on a 10k-document corpus generated here."""

import json
import random

import pytest
from typer import Typer
from typer.testing import CliRunner

from miles_envs.cli.search import register
from miles_envs.search.bm25 import FORMAT_VERSION, BM25Index, IndexFormatError
from miles_envs.search.documents import Document, read_corpus

N_DOCS = 10_000
VOCABULARY = [f"{a}{b}" for a in ("bra", "cle", "dro", "fli", "gra", "plo", "stu", "tri") for b in ("mel", "nox", "pad", "rin", "sov", "tek", "vul", "zan")]


def marker(i: int) -> str:
    """A word only document i contains (letters only, so the stemmer leaves it alone)."""
    letters = "bcdfghjklmnpqrstvwxz"
    word = ""
    for _ in range(4):
        i, r = divmod(i, len(letters))
        word += letters[r] + "o"
    return "q" + word + "k"


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as handle:
        for i in range(N_DOCS):
            words = rng.choices(VOCABULARY, k=25)
            words.insert(rng.randrange(len(words)), marker(i))
            handle.write(json.dumps({"id": f"d{i}", "title": f"Entry {i}", "text": " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def index(corpus_path):
    return BM25Index.build(read_corpus(corpus_path))


def test_marker_queries_find_their_document_in_one_batch(index):
    targets = random.Random(1).sample(range(N_DOCS), 256)
    queries = [f"{marker(i)} {VOCABULARY[i % len(VOCABULARY)]}" for i in targets]
    results = index.query(queries, k=5)
    assert len(results) == 256
    assert [hits[0].id for hits in results] == [f"d{i}" for i in targets]
    assert all(len(hits) == 5 and hits[0].score > hits[1].score for hits in results)


def test_batched_and_single_queries_agree(index):
    queries = [f"{marker(i)} {VOCABULARY[i % 64]} {VOCABULARY[(i * 7) % 64]}" for i in range(0, N_DOCS, 997)]
    batched = index.query(queries, k=4)
    assert batched == [index.query([query], k=4)[0] for query in queries]


def test_queries_sharing_no_term_return_nothing(index):
    assert index.query(["", "zzzz unknownword"], k=3) == [[], []]
    assert index.query([], k=3) == []


def test_saved_index_round_trips_and_is_versioned(index, tmp_path):
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["num_documents"] == N_DOCS
    loaded = BM25Index.load(tmp_path / "idx")
    queries = [marker(7), f"{marker(9999)} {VOCABULARY[3]}", VOCABULARY[5]]
    assert loaded.query(queries, k=3) == index.query(queries, k=3)
    [[top]] = loaded.query([marker(42)], k=1)
    assert (top.id, top.title, marker(42) in top.text) == ("d42", "Entry 42", True)

    manifest["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="rebuild it with `miles-envs index build`"):
        BM25Index.load(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        BM25Index.load(tmp_path)


def test_cli_builds_and_queries_an_index(corpus_path, tmp_path):
    app = Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "cli-index"
    built = runner.invoke(app, ["index", "build", str(corpus_path), "-o", str(out)])
    assert built.exit_code == 0, built.output
    assert f"indexed {N_DOCS} documents" in built.output
    assert json.loads((out / "build_metrics.json").read_text())["documents"] == N_DOCS
    queried = runner.invoke(app, ["index", "query", str(out), marker(1234), "-k", "1"])
    assert queried.exit_code == 0 and "d1234" in queried.output
    missing = runner.invoke(app, ["index", "query", str(tmp_path), "x"])
    assert missing.exit_code == 1 and "no manifest.json" in missing.output


def test_search_r1_contents_records_are_read(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_text(json.dumps({"id": "0", "contents": '"Paris"\nParis is the capital of France.'}) + "\n")
    assert list(read_corpus(path)) == [Document("0", "Paris", "Paris is the capital of France.")]
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: a corpus record needs 'text'"):
        list(read_corpus(path))
