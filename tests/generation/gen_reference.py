"""Slow, obvious references for the sampler: one row at a time, no padding, no KV cache, python loops."""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                     stop_token_ids: Sequence[int]) -> list[int]:
    """Greedy response of ONE prompt on a single-process (TP=1, PP=1) model: every step a full forward of the
    whole sequence so far, argmax of the last position's logits, stop after a stop token or max_new_tokens."""
    sequence = list(prompt_ids)
    response: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([sequence], dtype=torch.long)
        positions = torch.arange(len(sequence))[None, :]
        logits = model(input_ids, positions, None)  # [1, S, V]
        token = int(logits[0, -1].argmax())
        sequence.append(token)
        response.append(token)
        if token in stop_token_ids:
            break
    model.train(was_training)
    return response


def nucleus_reference(probs: Sequence[float], top_p: float) -> set[int]:
    """Token ids of the nucleus: walk the tokens from most to least likely, adding each while the mass collected
    BEFORE it is still below top_p (so the set is the smallest prefix whose mass reaches top_p)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept: set[int] = set()
    mass = 0.0
    for token in order:
        if kept and mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


def truncate_at_stop(response: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The response up to and including its first stop token (all of it when it has none)."""
    for index, token in enumerate(response):
        if token in stop_token_ids:
            return list(response[:index + 1])
    return list(response)


def stage_state_dict(full_state: dict, local_keys: Sequence[str], pp_rank: int, layers_per_stage: int) -> dict:
    """This pipeline stage's slice of a single-stage model's state dict: local layer i is global layer
    pp_rank * layers_per_stage + i; a tied output layer on the last stage takes the word embedding."""
    stage = {}
    for key in local_keys:
        source = key
        if key.startswith("decoder.layers."):
            local_index, rest = key[len("decoder.layers."):].split(".", 1)
            source = f"decoder.layers.{pp_rank * layers_per_stage + int(local_index)}.{rest}"
        elif key == "output_layer.weight" and key not in full_state:
            source = "embedding.word_embeddings.weight"
        stage[key] = full_state[source] if source in full_state else None
    return stage
