"""A command whose inputs are bad writes nothing: the output directory (config.yaml, metrics, caches under it) does
not appear when the data file is missing, for every command that trains or fills a cache."""
from __future__ import annotations

import subprocess
import sys

import pytest

from material import smollm2_gguf_path

pytestmark = pytest.mark.fault_injection


@pytest.mark.parametrize("command", ["train-rm", "train-dpo", "segment"])
def test_a_missing_data_file_leaves_no_output_directory(command, tmp_path):
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "megaseg.cli", command, "model.random_init=true", "model.vocab_size=49152",
         f"model.tokenizer={smollm2_gguf_path()}", f"data.train_path={tmp_path / 'missing.jsonl'}",
         f"logging.out_dir={out_dir}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"data file '{tmp_path / 'missing.jsonl'}' does not exist" in result.stderr
    assert not out_dir.exists(), sorted(str(path) for path in out_dir.rglob("*"))
