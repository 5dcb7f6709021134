"""The frozen-prefix split against the whole model's forward (tiny model, right-padded rows of different lengths):
values and the top layers' gradients equal; the layer input captured from a GPT forward equals the scalar-head
model's bottom half; the PrefixFeatures top path (training and scoring) equals the whole model's."""
from __future__ import annotations

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=null", "model.kv_channels=null", "model.vocab_size=128", "model.random_init=true"]


def _split_equals_whole(rank, world_size):
    from megaseg.config import load_config
    from megaseg.data.encoding import TokenizedSequence
    from megaseg.models.frozen_prefix import LayerInputCapture, bottom_hidden_states, top_values
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.training.reward_model.frozen_prefix import PrefixFeatures

    config = load_config(None, TINY)
    initialize_parallel(config.parallel, seed=5)
    model = build_reward_model(config.model, config.parallel, seed=5)
    generator = torch.Generator().manual_seed(0)
    lengths = [11, 7, 16, 3]
    input_ids = torch.zeros(len(lengths), 16, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, 128, (length,), generator=generator)
    positions = torch.arange(16).expand(len(lengths), 16)
    weights = torch.randn(len(lengths), 16, generator=generator)
    real = torch.arange(16)[None] < torch.tensor(lengths)[:, None]
    results = {}
    for num_bottom in (1, 2, 3):
        top = [p for name, p in model.named_parameters()
               if name.startswith("head") or "final_layernorm" in name
               or any(name.startswith(f"decoder.layers.{i}.") for i in range(num_bottom, 4))]
        model.zero_grad()
        whole = model(input_ids, positions, None)
        (whole * weights * real).sum().backward()
        whole_grads = [p.grad.clone() for p in top]
        model.zero_grad()
        with torch.no_grad():
            hidden = bottom_hidden_states(model, input_ids, positions, num_bottom)
        split = top_values(model, hidden, num_bottom)
        (split * weights * real).sum().backward()
        results[num_bottom] = {
            "values": float((whole - split).abs()[real].max()),
            "grads": max(float((a - p.grad).abs().max()) for a, p in zip(whole_grads, top)),
            "grad_scale": max(float(a.abs().max()) for a in whole_grads)}
    # A GPT language model with the same decoder weights: the input of layer 2 it computes on its way to the logits.
    gpt = build_gpt_model(config.model, config.parallel)
    gpt.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head")}, strict=False)
    capture = LayerInputCapture(2)
    with torch.no_grad(), capture.attached(gpt):
        gpt(input_ids, positions, None)
        captured = capture.take()
        bottom = bottom_hidden_states(model, input_ids, positions, 2)
    results["capture"] = float((captured - bottom).abs()[real.T].max())
    # PrefixFeatures: fed from the GPT capture for some rows, the bottom pass for the others; the scorer's top path.
    sequences = [TokenizedSequence(tuple(input_ids[r, :2].tolist()), tuple(input_ids[r, 2:n].tolist()), False)
                 for r, n in enumerate(lengths)]
    features = PrefixFeatures(2, "test")
    features.add_batch(captured, input_ids[:2], lengths[:2], num_real_rows=2)
    with torch.no_grad():
        scored = features.infer_sequences(model, sequences, micro_batch_size=3,
                                          output_fn=lambda values, batch: [values[k] for k in range(values.shape[0])])
        whole = model(input_ids, positions, None)
    results["scoring"] = max(float((scored[r][:n] - whole[r, :n]).abs().max()) for r, n in enumerate(lengths))
    results["num_features"] = len(features)
    return results


def test_top_layers_from_kept_hidden_states_equal_the_whole_model():
    results = run_distributed(_split_equals_whole, 1)[0]
    for num_bottom in (1, 2, 3):
        assert results[num_bottom]["values"] < 1e-5, (num_bottom, results[num_bottom])
        assert results[num_bottom]["grad_scale"] > 1e-3  # the gradients compared are not all zero
        assert results[num_bottom]["grads"] < 1e-5 * max(1.0, results[num_bottom]["grad_scale"]), results[num_bottom]
    assert results["capture"] < 1e-5
    assert results["scoring"] < 1e-5
    assert results["num_features"] == 4


def _train_both_ways(rank, world_size, tokenizer_dir, out_dir):
    from pathlib import Path

    from megaseg.parallel import initialize_parallel
    from megaseg.parallel.initialize import seed_everything
    from megaseg.training.reward_model.trainer import RewardModelTrainer
    from rm_test_setup import logged, tiny_rm_config

    results, ctx = {}, None
    for frozen_prefix in (True, False):
        # Both runs on right-padded rows (the prefix path's layout): packed rows round differently, which Adam
        # amplifies where a gradient is ~0 (packed == padded is tests/models/test_models_packing.py's).
        config = tiny_rm_config(Path(tokenizer_dir), Path(out_dir) / str(frozen_prefix), **{
            "rm.train_top_layers": 1, "rm.frozen_prefix": frozen_prefix, "rm.max_steps": 3, "data.packing": False})
        ctx = ctx or initialize_parallel(config.parallel, config.seed)
        seed_everything(config.seed, 0)  # the same random backbone for both runs
        trainer = RewardModelTrainer.from_config(config, ctx)
        result = trainer.run()
        results[frozen_prefix] = {"on": trainer.prefix_features is not None,
                                  "loss": logged(config.logging.out_dir), "eval": dict(result.last_eval or {}),
                                  "params": {k: v.detach().clone() for k, v in
                                             trainer.setup.model.module.named_parameters()}}
    return results


def test_training_through_the_top_layers_equals_the_whole_model(tmp_path, tmp_path_factory):
    from rm_test_setup import smollm2_tokenizer_dir

    results = run_distributed(_train_both_ways, 1, str(smollm2_tokenizer_dir(tmp_path_factory)), str(tmp_path))[0]
    fast, whole = results[True], results[False]
    assert fast["on"] and not whole["on"]
    assert fast["loss"].keys() == whole["loss"].keys() and len(fast["loss"]) == 3
    for step, loss in whole["loss"].items():
        assert abs(fast["loss"][step] - loss) < 1e-5, (step, fast["loss"], whole["loss"])
    assert abs(fast["eval"]["acc"] - whole["eval"]["acc"]) < 1e-9
    assert abs(fast["eval"]["loss"] - whole["eval"]["loss"]) < 1e-5
    for name, value in whole["params"].items():
        assert torch.allclose(fast["params"][name], value, atol=1e-5), name
