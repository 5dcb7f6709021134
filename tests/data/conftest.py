"""Tokenizers for the data-layer tests, loaded once per session (the GGUF one takes seconds)."""
import pytest

from material import shared_tokenizer_dir, smollm2_gguf_path
from megaseg.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return load_tokenizer(shared_tokenizer_dir("llama3-hf"))


@pytest.fixture(scope="session")
def phi3_tokenizer():
    return load_tokenizer(shared_tokenizer_dir("phi-3"))


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    return load_tokenizer(shared_tokenizer_dir("qwen2"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer(smollm2_gguf_path())
