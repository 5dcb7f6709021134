"""What the megatron-backed generation tests run inside spawned ranks: a tiny model, ragged prompts, and every
generate() call whose result a test then compares with an independent reference.

Each scenario returns plain tensors / lists so that the parent (pytest) process can assert on them.
"""
from __future__ import annotations

import dataclasses

import torch

from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.data.batch import collate_prompts
from megaseg.data.encoding import TokenizedPrompt

SEED = 1234
PAD_ID = 0
MAX_NEW_TOKENS = 10
PROMPT_LENGTHS = (5, 9, 3, 7)
# 2 layers, hidden 64, 4 heads, vocab 128; weights 15x the default init so that greedy decoding does not simply
# repeat the last prompt token (what a near-zero random model does), which would make the comparisons toothless.
TINY_MODEL = dataclasses.replace(ModelConfig(), init_method_std=0.3)
# The stop token of the runs that are not about stopping. Any id would do (the references apply the same stop
# rule); prompts never contain it.
DEFAULT_STOP = (127,)


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[TokenizedPrompt]:
    generator = torch.Generator().manual_seed(seed)
    return [TokenizedPrompt(id=f"prompt-{index}", source="test",
                            prompt_ids=tuple(torch.randint(1, 127, (length,), generator=generator).tolist()))
            for index, length in enumerate(lengths)]


def _output_fields(output) -> dict:
    batch = output.sequences
    return {
        "responses": output.response_token_ids(),
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "response_mask": batch.response_mask,
        "eos_mask": batch.eos_mask, "position_ids": batch.position_ids,
        "prompt_lengths": output.prompt_lengths, "response_lengths": output.response_lengths,
        "stopped_mask": output.stopped_mask, "prompt_ids": output.prompt_ids,
    }


def _run(model, ctx, prompts, settings, *, seed=None, backend="kv_cache"):
    from megaseg.generation import generate

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return generate(model, collate_prompts(prompts, PAD_ID), settings, ctx, pad_token_id=PAD_ID,
                    generator=generator, backend=backend)


def _greedy(stop=DEFAULT_STOP):
    from megaseg.generation import SamplingSettings

    return SamplingSettings(max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=stop, greedy=True)


def _sampling(**overrides):
    from megaseg.generation import SamplingSettings

    values = dict(max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=DEFAULT_STOP, temperature=1.0, top_p=0.9)
    values.update(overrides)
    return SamplingSettings(**values)


def _pick_stop_tokens(responses: list[list[int]]) -> tuple[int, ...]:
    """Two tokens from the middle of rows 0 and 1 of the greedy responses, so those rows stop early."""
    return (responses[0][3], responses[1][5])


def _refusals(model, ctx, prompts) -> dict:
    """The ValueError message of each call the sampler must refuse before running the model."""
    from megaseg.generation import SamplingSettings

    calls = {
        "backend": lambda: _run(model, ctx, prompts, _greedy(), backend="beam_search"),
        "no_generator": lambda: _run(model, ctx, prompts, _sampling()),
        "stop_outside_vocab": lambda: _run(model, ctx, prompts, _greedy(stop=(500,))),
        "too_long": lambda: _run(model, ctx, prompts, SamplingSettings(max_new_tokens=2100, stop_token_ids=(1,),
                                                                       greedy=True)),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _rows_rotated_per_call(call) -> list[int]:
    """The sequence length of every RoPE application during ``call()``, wherever megatron or megaseg applies it."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    rows: list[int] = []
    original = rope_utils.apply_rotary_pos_emb

    def recording(t, *args, **kwargs):
        rows.append(t.shape[0])
        return original(t, *args, **kwargs)

    rope_utils.apply_rotary_pos_emb = attention.apply_rotary_pos_emb = recording
    try:
        call()
    finally:
        rope_utils.apply_rotary_pos_emb = attention.apply_rotary_pos_emb = original
    return rows


def single_process(rank: int, world_size: int) -> dict:
    """TP=1, PP=1: the KV-cache sampler against the per-row full-forward reference, and its other properties."""
    from gen_reference import greedy_reference

    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    ctx = initialize_parallel(ParallelConfig(), seed=SEED)
    model = build_gpt_model(TINY_MODEL, ParallelConfig())
    prompts = make_prompts()
    result: dict = {"prompts": [list(p.prompt_ids) for p in prompts]}
    result["reference"] = [greedy_reference(model, p.prompt_ids, MAX_NEW_TOKENS, DEFAULT_STOP) for p in prompts]
    result["kv_greedy"] = _output_fields(_run(model, ctx, prompts, _greedy()))
    result["rotated_rows"] = _rows_rotated_per_call(lambda: _run(model, ctx, prompts, _greedy()))
    result["full_forward_greedy"] = _output_fields(_run(model, ctx, prompts, _greedy(), backend="full_forward"))
    result["alone"] = [_run(model, ctx, [p], _greedy()).response_token_ids()[0] for p in prompts]
    stop = _pick_stop_tokens(result["reference"])
    result["stop_tokens"] = stop
    result["stop_reference"] = [greedy_reference(model, p.prompt_ids, MAX_NEW_TOKENS, stop) for p in prompts]
    result["stop_run"] = _output_fields(_run(model, ctx, prompts, _greedy(stop)))
    result["sampled"] = _run(model, ctx, prompts, _sampling(), seed=11).response_token_ids()
    result["sampled_again"] = _run(model, ctx, prompts, _sampling(), seed=11).response_token_ids()
    result["sampled_other_seed"] = _run(model, ctx, prompts, _sampling(), seed=12).response_token_ids()
    result["sampled_full_forward"] = _run(model, ctx, prompts, _sampling(), seed=11,
                                          backend="full_forward").response_token_ids()
    result["top_k_1"] = _run(model, ctx, prompts, _sampling(top_k=1, temperature=0.7), seed=5).response_token_ids()
    model.train()
    _run(model, ctx, prompts, _greedy())
    result["training_after_generate"] = model.training
    result["errors"] = _refusals(model, ctx, prompts)
    result["state_dict"] = {key: value for key, value in model.state_dict().items() if torch.is_tensor(value)}
    return result


def tensor_then_pipeline_parallel(rank: int, world_size: int, full_state: dict) -> dict:
    """Two ranks: TP=2 (weights from the same seeded CPU initialisation as TP=1), then PP=2 (weights loaded from
    the TP=1 model's state dict, one layer per stage)."""
    from gen_reference import stage_state_dict

    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import cuda_device_redirect, destroy_parallel, initialize_parallel

    prompts = make_prompts()
    result: dict = {}
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    ctx = initialize_parallel(tp2, seed=SEED)
    model = build_gpt_model(TINY_MODEL, tp2)
    result["tp2_greedy"] = _run(model, ctx, prompts, _greedy()).response_token_ids()
    result["tp2_full_forward_greedy"] = _run(model, ctx, prompts, _greedy(), backend="full_forward"
                                             ).response_token_ids()
    result["tp2_sampled"] = _run(model, ctx, prompts, _sampling(), seed=11).response_token_ids()
    destroy_parallel()

    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    ctx = initialize_parallel(pp2, seed=SEED)
    # megatron moves the tied output layer's weight with .cuda() when it builds the last stage (not a CPU op).
    with cuda_device_redirect():
        model = build_gpt_model(TINY_MODEL, pp2)
    layers_per_stage = TINY_MODEL.num_layers // 2
    model.load_state_dict(stage_state_dict(full_state, list(model.state_dict()), ctx.pp_rank, layers_per_stage))
    result["pp2_greedy"] = _run(model, ctx, prompts, _greedy()).response_token_ids()
    result["pp2_full_forward_greedy"] = _run(model, ctx, prompts, _greedy(), backend="full_forward"
                                             ).response_token_ids()
    result["pp2_sampled"] = _run(model, ctx, prompts, _sampling(), seed=11).response_token_ids()
    return result
