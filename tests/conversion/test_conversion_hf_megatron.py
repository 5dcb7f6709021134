"""HF -> megatron -> HF on tiny models of every architecture: megatron logits equal HF's (TP=1 in process, TP=2 on
spawned gloo ranks, from checkpoints saved at TP=1 and TP=2), and the export gives back bit-identical weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conversion_models import ARCH_CASES, hf_logits, megatron_logits_in_process, megatron_logits_on_ranks, \
    sample_input_ids
from megaseg.conversion import convert_hf_to_megatron, convert_megatron_to_hf
from megaseg.conversion.model_yaml import MODEL_YAML, find_model_config
from megaseg.parallel.spawn import run_distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def _hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    expected, actual = _hf_weights(expected_dir), _hf_weights(actual_dir)
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_megatron_logits_equal_hf_logits_at_tp1(converted_cases, name):
    case = converted_cases[name]
    input_ids = sample_input_ids()
    expected = hf_logits(case.hf_model, input_ids)
    actual = megatron_logits_in_process(case.megatron_dir, input_ids)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_converted_directory_holds_config_tokenizer_and_source_metadata(converted_cases):
    case = converted_cases["qwen2"]
    model_cfg, path = find_model_config(case.megatron_dir)
    assert path == case.megatron_dir / MODEL_YAML
    assert (model_cfg.family, model_cfg.add_qkv_bias, model_cfg.num_query_groups) == ("qwen2", True, 2)
    assert (model_cfg.rotary_base, model_cfg.tie_word_embeddings) == (1e6, False)
    assert model_cfg.checkpoint == str(case.megatron_dir) and model_cfg.eos_token_ids == [2]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False) == "<s> w5 w6 </s> "
    assert (case.megatron_dir / "hf_metadata" / "config.json").is_file()
    assert (case.megatron_dir / "metadata.json").is_file()


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_megatron_to_hf_round_trip_is_bit_exact(converted_cases, tmp_path, name):
    from transformers import AutoModelForCausalLM

    case = converted_cases[name]
    out = convert_megatron_to_hf(case.megatron_dir, tmp_path / "hf")
    _assert_same_weights(case.hf_dir, out)
    original = json.loads((case.hf_dir / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k != "transformers_version"} == \
        {k: v for k, v in original.items() if k != "transformers_version"}
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    input_ids = sample_input_ids()
    assert torch.equal(hf_logits(reloaded, input_ids), hf_logits(case.hf_model, input_ids))
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


@pytest.mark.distributed
def test_tp2_conversion_and_tp2_loading_match_hf(converted_cases, tmp_path):
    # Saved by two ranks at TP=2 (the CLI path), then every checkpoint -- TP=1- and TP=2-saved -- loaded at TP=2.
    qwen2 = converted_cases["qwen2"]
    tp2_dir = convert_hf_to_megatron(qwen2.hf_dir, tmp_path / "qwen2_tp2", tp=2)
    assert len(list(tp2_dir.glob("__1_*.distcp"))) > 0  # rank 1 wrote its own shard
    input_ids = sample_input_ids(seed=11)
    cases = list(converted_cases.values())
    jobs = [(str(case.megatron_dir), input_ids) for case in cases] + [(str(tp2_dir), input_ids)]
    per_rank = run_distributed(megatron_logits_on_ranks, 2, jobs, 2, timeout=240)
    expected = [hf_logits(case.hf_model, input_ids) for case in cases] + [hf_logits(qwen2.hf_model, input_ids)]
    for rank_results in per_rank:
        for actual, reference in zip(rank_results, expected):
            torch.testing.assert_close(actual, reference, atol=ATOL, rtol=0)
    # The TP=2-saved checkpoint reads back at TP=1 in one process, bit-exactly.
    _assert_same_weights(qwen2.hf_dir, convert_megatron_to_hf(tp2_dir, tmp_path / "qwen2_back"))


def test_cli_and_tools_script_run_the_same_conversion(converted_cases, tmp_path):
    from megaseg.cli import main

    case = converted_cases["llama_untied"]
    assert main(["convert", "megatron-to-hf", "--ckpt", str(case.megatron_dir), "--out",
                 str(tmp_path / "via_cli")]) == 0
    _assert_same_weights(case.hf_dir, tmp_path / "via_cli")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "megatron-to-hf",
                             "--ckpt", str(case.megatron_dir), "--out", str(tmp_path / "via_tool")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_weights(case.hf_dir, tmp_path / "via_tool")


@pytest.mark.distributed
def test_pp2_conversion_of_tied_embeddings_reads_back_bit_exact(converted_cases, tmp_path):
    # Under pipeline parallelism the last stage holds a copy of the tied embedding as its output layer, saved
    # under the embedding's key; the export must find one embedding and no lm_head.
    case = converted_cases["llama_tied"]
    pp2_dir = convert_hf_to_megatron(case.hf_dir, tmp_path / "pp2", pp=2)
    assert find_model_config(pp2_dir)[0].tie_word_embeddings
    _assert_same_weights(case.hf_dir, convert_megatron_to_hf(pp2_dir, tmp_path / "back"))
