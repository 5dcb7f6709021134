"""Every bad input is a ValueError naming the problem, raised before anything is written: no output directory, and
no staging directory left behind (also when a conversion fails half-way)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megaseg.cli import main
from megaseg.conversion import convert_gguf_to_hf, convert_hf_to_megatron, convert_megatron_to_hf
from megaseg.conversion.model_yaml import MODEL_YAML


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def _copy(hf_cases, name: str, tmp_path: Path) -> Path:
    copy = tmp_path / f"{name}_copy"
    shutil.copytree(hf_cases[name][0], copy)
    return copy


def _edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_lists_the_supported_ones(hf_cases, tmp_path):
    hf_dir = _copy(hf_cases, "llama_untied", tmp_path)
    _edit_config(hf_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported Hugging Face architecture GPT2LMHeadModel.*"
                                         "LlamaForCausalLM.*Qwen2ForCausalLM.*Phi3ForCausalLM"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_missing_weight_is_named(hf_cases, tmp_path):
    hf_dir = _copy(hf_cases, "qwen2", tmp_path)
    weights = load_file(str(hf_dir / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing tensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_shape_mismatch_with_config_is_named(hf_cases, tmp_path):
    hf_dir = _copy(hf_cases, "phi3", tmp_path)
    _edit_config(hf_dir, intermediate_size=96)
    with pytest.raises(ValueError, match=r"shape mismatches.*gate_up_proj.weight: stored \(256, 64\), config.json "
                                         r"implies \(192, 64\)"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("tp,pp,field", [(3, 1, "num_attention_heads=4"), (4, 1, "num_query_groups=2"),
                                         (1, 3, "num_layers=2")])
def test_layouts_that_do_not_divide_the_model(hf_cases, tmp_path, tp, pp, field):
    with pytest.raises(ValueError, match=rf"cannot be split with --tp {tp} --pp {pp}.*{field}"):
        convert_hf_to_megatron(hf_cases["llama_tied"][0], tmp_path / "out", tp=tp, pp=pp)
    _assert_nothing_written(tmp_path / "out")


def test_an_existing_output_is_never_overwritten(hf_cases, converted_cases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert_hf_to_megatron(hf_cases["llama_tied"][0], out)
    with pytest.raises(ValueError, match="already exists"):
        convert_megatron_to_hf(converted_cases["llama_tied"].megatron_dir, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_a_reward_model_export_is_not_imported_as_a_language_model(hf_cases, tmp_path):
    hf_dir = _copy(hf_cases, "llama_tied", tmp_path)
    _edit_config(hf_dir, architectures=["LlamaForTokenClassification"])
    with pytest.raises(ValueError, match="reward model export"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_megatron_side_errors(converted_cases, hf_cases, tmp_path):
    with pytest.raises(ValueError, match="not a megatron dist checkpoint"):
        convert_megatron_to_hf(hf_cases["llama_tied"][0], tmp_path / "out")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted_cases["llama_untied"].megatron_dir, ckpt)
    yaml = (ckpt / MODEL_YAML).read_text()
    (ckpt / MODEL_YAML).write_text(yaml.replace("ffn_hidden_size: 128", "ffn_hidden_size: 96"))
    with pytest.raises(ValueError, match=r"does not match the model config from .*megaseg_model.yaml.*"
                                         r"mlp.linear_fc1.weight: stored \(256, 64\), config implies \(192, 64\)"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_a_failure_half_way_leaves_no_output(converted_cases, tmp_path, monkeypatch):
    from megaseg.conversion import megatron_to_hf

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(megatron_to_hf, "_write_configs", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_megatron_to_hf(converted_cases["mistral"].megatron_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_gguf_path_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holding 0 .gguf files"):
        convert_gguf_to_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    # Not a GGUF at all, and a GGUF header cut short: the error names the file.
    (tmp_path / "random.gguf").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    for name in ("random.gguf", "cut.gguf"):
        with pytest.raises(ValueError, match=rf"{tmp_path / name} is not a readable GGUF file"):
            convert_gguf_to_hf(tmp_path / name, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_cli_reports_flag_mistakes_as_errors(tmp_path, capsys):
    assert main(["convert", "megatron-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--tp", "2"]) == 2
    assert "does not take --tp" in capsys.readouterr().err
    assert main(["convert", "hf-to-megatron", "--out", str(tmp_path / "o")]) == 2
    assert "needs --hf" in capsys.readouterr().err
    assert main(["convert", "hf-to-gguf", "--out", str(tmp_path / "o")]) == 2
    assert "unknown conversion 'hf-to-gguf'" in capsys.readouterr().err
    (tmp_path / "no_gguf").mkdir()
    assert main(["convert", "gguf-to-hf", "--gguf", str(tmp_path / "no_gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "holding 0 .gguf files" in capsys.readouterr().err
    _assert_nothing_written(tmp_path / "o")


def test_the_ckpt_argument_finds_the_model_of_every_layout_megaseg_writes(tmp_path):
    from megaseg.conversion.megatron_to_hf import resolve_dist_checkpoint_dir

    def model_dir(path):
        path.mkdir(parents=True)
        (path / "metadata.json").write_text("{}")
        return path

    rm_run = tmp_path / "rm_run"
    rm_state = model_dir(rm_run / "reward_model" / "state")
    assert resolve_dist_checkpoint_dir(rm_run) == rm_state
    assert resolve_dist_checkpoint_dir(rm_run / "reward_model") == rm_state
    dpo_root = tmp_path / "dpo" / "checkpoints"
    policy = model_dir(dpo_root / "step_000003" / "policy")
    model_dir(dpo_root / "step_000003" / "rng")
    (dpo_root / "latest").write_text("step_000003\n")
    assert resolve_dist_checkpoint_dir(dpo_root) == policy
    assert resolve_dist_checkpoint_dir(dpo_root / "step_000003") == policy
    ppo_step = tmp_path / "ppo" / "checkpoints" / "step_000002"
    actor = model_dir(ppo_step / "actor")
    model_dir(ppo_step / "critic")
    with pytest.raises(ValueError, match=r"holds 2 models \(actor, critic\): name one"):
        resolve_dist_checkpoint_dir(ppo_step)
    assert resolve_dist_checkpoint_dir(actor) == actor
    with pytest.raises(ValueError, match="is not a megatron dist checkpoint"):
        resolve_dist_checkpoint_dir(tmp_path / "nothing")
