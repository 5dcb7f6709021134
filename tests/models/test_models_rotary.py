"""megaseg's cached RoPE application (megaseg.models.rotary.cached_rotary_pos_emb_bshd) equals megatron-core's own
``_apply_rotary_pos_emb_bshd``, the function it replaces: values and gradients, fp32 and bf16, a sliced freqs tensor
(the decode step's), the packed (THD) path, megatron's fallbacks; and a write into freqs is never served from the
cache."""
from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megaseg.models import rotary


class _OneRankGroup:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


@pytest.fixture(scope="module")
def megatron_bshd():
    assert rotary.install_cached_rope(), "this megatron-core's _apply_rotary_pos_emb_bshd has another signature"
    assert rope_utils._apply_rotary_pos_emb_bshd is rotary.cached_rotary_pos_emb_bshd
    return rotary._megatron_bshd


def _freqs(length: int, dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]  # megatron's [s, 1, 1, d] layout


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_equals_megatron_values_and_gradients(megatron_bshd, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    freqs = _freqs(11, 16)
    base = torch.randn(11, 3, 4, 16, generator=generator)
    upstream = torch.randn(11, 3, 4, 16, generator=generator).to(dtype)
    outputs, grads = [], []
    for function in (megatron_bshd, rotary.cached_rotary_pos_emb_bshd, rotary.cached_rotary_pos_emb_bshd):
        t = base.to(dtype).requires_grad_()
        out = function(t, freqs, False, False, 1.0)
        out.backward(upstream)
        outputs.append(out.detach().float())
        grads.append(t.grad.float())
    for out, grad in zip(outputs[1:], grads[1:]):  # the second cached call is served from the cache
        torch.testing.assert_close(out, outputs[0], atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(grad, grads[0], atol=tolerance, rtol=tolerance)


def test_slices_and_mscale(megatron_bshd):
    freqs = _freqs(32, 8)
    t = torch.randn(1, 2, 3, 8)
    for start in (0, 5, 31):  # one decode column each: views of one storage at other offsets
        column = freqs[start:start + 1]
        for mscale in (1.0, 0.7):
            torch.testing.assert_close(rotary.cached_rotary_pos_emb_bshd(t, column, False, False, mscale),
                                       megatron_bshd(t, column, False, False, mscale))


def test_in_place_write_into_freqs_is_seen(megatron_bshd):
    freqs = _freqs(6, 8)
    t = torch.randn(6, 1, 2, 8)
    before = rotary.cached_rotary_pos_emb_bshd(t, freqs)
    freqs.mul_(3.0)
    after = rotary.cached_rotary_pos_emb_bshd(t, freqs)
    torch.testing.assert_close(after, megatron_bshd(t, freqs, False, False, 1.0))
    assert not torch.allclose(before, after)


def test_fallbacks_are_megatrons(megatron_bshd):
    freqs = _freqs(5, 8)
    t = torch.randn(5, 2, 2, 12)  # a partial rotary dimension: 8 of 12 rotated
    torch.testing.assert_close(rotary.cached_rotary_pos_emb_bshd(t, freqs), megatron_bshd(t, freqs, False, False, 1.0))
    t = torch.randn(5, 2, 2, 8)
    torch.testing.assert_close(rotary.cached_rotary_pos_emb_bshd(t, freqs, True),
                               megatron_bshd(t, freqs, True, False, 1.0))
    with torch.inference_mode():  # inference tensors have no version counter: computed, not cached
        frozen = _freqs(5, 8)
        torch.testing.assert_close(rotary.cached_rotary_pos_emb_bshd(t, frozen), megatron_bshd(t, frozen, False, False, 1.0))


def test_packed_thd_equals_per_sequence_megatron(megatron_bshd):
    freqs = _freqs(64, 8)
    lengths = [5, 9, 3]
    cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    t = torch.randn(17, 2, 8)
    packed = rope_utils._apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_group=_OneRankGroup())
    # Every sequence rotated from position 0, by megatron's own function.
    expected = torch.cat([megatron_bshd(part.unsqueeze(1), freqs[:len(part)], False, False, 1.0).squeeze(1)
                          for part in torch.split(t, lengths)])
    torch.testing.assert_close(packed, expected)


def _reward_values_before_and_after_a_gpt_model(rank, world_size):
    from megaseg.config import load_config
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_reward_model
    from megaseg.parallel import initialize_parallel

    config = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                "model.ffn_hidden_size=64", "model.vocab_size=128", "model.params_dtype=float32"])
    initialize_parallel(config.parallel, seed=3)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(24).expand(2, 24)
    first = build_reward_model(config.model, config.parallel, seed=3).eval()
    installed_by_reward_model = rope_utils._apply_rotary_pos_emb_bshd is rotary.cached_rotary_pos_emb_bshd
    with torch.no_grad():
        before = first(tokens, positions)
    build_gpt_model(config.model, config.parallel)
    second = build_reward_model(config.model, config.parallel, seed=3).eval()
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        after = second(tokens, positions)
    return installed_by_reward_model, before, after


def test_reward_model_numbers_do_not_depend_on_a_gpt_model_built_before():
    """The cached RoPE is installed by every model's layer spec: a reward model built first in a fresh process
    computes what it computes after a GPTModel exists (a resumed train-rm that reuses its entropy cache builds no
    GPTModel, and its losses must equal the uninterrupted run's exactly)."""
    from megaseg.parallel.spawn import run_distributed

    (installed, before, after), = run_distributed(_reward_values_before_and_after_a_gpt_model, 1)
    assert installed
    assert torch.equal(before, after)
