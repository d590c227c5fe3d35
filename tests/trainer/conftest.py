import pytest

from tests.trainer.tiny import tiny_moe


@pytest.fixture
def moe_model():
    return tiny_moe()
