import pytest

from tests import tiny


@pytest.fixture
def tokenizer():
    return tiny.tiny_tokenizer()


@pytest.fixture
def llama():
    return tiny.tiny_llama()


@pytest.fixture
def gpt2():
    return tiny.tiny_gpt2()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own LORAKIT_HOME unless it sets one."""
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path_factory.mktemp("lorakit_home")))
