"""Every phase of the experience maker against the slow per-sequence reference (tests/training/ppo_reference.py).

One spawned rank builds tiny random actor / reference / critic / reward models, runs ``make_experience`` on a fixed
rollout batch (a finished response, a truncated one, an EOS-only one, a long one) for every reward granularity,
normalizer and interpolation of the paper, and also returns the models' dense outputs. The test process then rebuilds
each row's experience with Python loops from those dense outputs and compares field by field: actor and reference
log-probs, reference entropies, critic values, segment ends, raw / normalized / interpolated+clamped rewards, KL,
rewards, GAE advantages (whitened over the batch) and returns. Every case runs twice, with ``kernels: torch`` and
with ``kernels: triton`` (the fused reward-shaping, GAE, moments and vocabulary kernels, in Triton's interpreter on
this CPU): the trainer's code is the same, and both must match the reference.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

import ppo_reference as ref
from ppo_test_setup import EOS_ID, PAD_ID, sentence_marker_every_7th, tiny_config

pytestmark = pytest.mark.distributed

LOCATION = dict(w_mu=0.7668, b_mu=0.4705, w_sigma=0.2569, b_sigma=2.8339, p_min=0.05)
SCALAR = dict(mean=0.3, std=1.7)
KL_COEF = 0.05
# name -> (config overrides, normalizer spec)
CASES = {
    "segment-location-even": (["ppo.reward_granularity=segment"], "location"),
    "segment-global-repeat": (["ppo.interpolation=repeat", "normalizer.kind=global"], "global"),
    "segment-last-none-clipped": (["ppo.interpolation=none", "normalizer.kind=last_segment", "ppo.reward_clip=0.1"], "last"),
    "segment-none-even": (["normalizer.kind=none"], "none"),
    "token": (["ppo.reward_granularity=token", "segmentation.mode=token", "normalizer.kind=none"], "none"),
    "sentence": (["ppo.reward_granularity=sentence", "segmentation.mode=sentence"], "location"),
    "ngram-3": (["ppo.reward_granularity=ngram", "segmentation.mode=ngram", "segmentation.ngram_size=3",
                 "normalizer.kind=global"], "global"),
    "bandit": (["ppo.reward_granularity=bandit", "segmentation.mode=bandit", "normalizer.kind=bandit",
                "ppo.interpolation=none", "ppo.value_clip=0.2"], "bandit"),
    "bandit-as-segment": (["ppo.reward_granularity=bandit_as_segment"], "location"),
    "segment-as-bandit": (["ppo.reward_granularity=segment_as_bandit", "normalizer.kind=bandit",
                           "ppo.interpolation=none"], "bandit"),
    "segment-as-bandit-sum": (["ppo.reward_granularity=segment_as_bandit", "normalizer.kind=bandit",
                               "ppo.interpolation=none", "rm.aggregation=sum", "ppo.lam=0.9", "ppo.gamma=0.99"],
                              "bandit"),
}
KERNELS = ("torch", "triton")
FIELDS = ("log_probs", "ref_log_probs", "ref_entropy", "values", "raw_rewards", "positions", "normalized_rewards",
          "token_rewards", "kl", "rewards", "returns")


def _rollout():
    """4 rows: finished (EOS), truncated (no EOS), EOS only, long finished; right-padded."""
    from megaseg.data.batch import collate_sequences
    from megaseg.data.encoding import TokenizedSequence

    generator = torch.Generator().manual_seed(11)

    def ids(n):
        return tuple(torch.randint(2, 128, (n,), generator=generator).tolist())

    rows = [TokenizedSequence(ids(4), ids(5) + (EOS_ID,), True), TokenizedSequence(ids(3), ids(7), False),
            TokenizedSequence(ids(5), (EOS_ID,), True), TokenizedSequence(ids(2), ids(10) + (EOS_ID,), True)]
    return collate_sequences(rows, PAD_ID)


def _normalizer(spec: str, mode: str):
    from megaseg.algorithms.normalizer import (BanditNormalizer, GlobalNormalizer, IdentityNormalizer,
                                               LastSegmentNormalizer, LocationNormalizer)
    meta = dict(model="tiny", c_ent=None, aggregation="mean", segmentation=mode)
    if spec == "location":
        return LocationNormalizer(**LOCATION, **meta)
    if spec == "none":
        return IdentityNormalizer(**meta)
    cls = {"global": GlobalNormalizer, "last": LastSegmentNormalizer, "bandit": BanditNormalizer}[spec]
    return cls(**SCALAR, **meta)


def _run_cases(rank, world_size):
    from megaseg.kernels.dispatch import kernels_mode
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_critic, build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.training.ppo.experience import ExperienceSources, make_experience
    from megaseg.training.ppo.experience import RewardModelScorer
    from megaseg.training.common.metrics import PhaseTimer
    from megaseg.training.ppo.reward_plan import resolve_reward_plan

    base = tiny_config()
    ctx = initialize_parallel(base.parallel, seed=21)
    actor, reference = build_gpt_model(base.model, base.parallel), build_gpt_model(base.model, base.parallel)
    critic = build_critic(base.model, base.parallel, seed=base.seed)
    reward_model = build_reward_model(base.model, base.parallel, seed=base.seed + 1)
    for model in (actor, reference, critic, reward_model):
        model.eval()
    rollout = _rollout()
    positions = torch.arange(rollout.seq_length).expand_as(rollout.input_ids)
    with torch.no_grad():
        dense = {"actor_logits": actor(rollout.input_ids, positions, None),
                 "ref_logits": reference(rollout.input_ids, positions, None),
                 "critic_head": critic(rollout.input_ids, positions, None),
                 "rm_head": reward_model(rollout.input_ids, positions, None)}
    # A cutoff between the reference entropies of the responses, so entropy segments are neither 1 token nor all.
    from megaseg.algorithms.entropy import token_entropy
    cutoff = float(token_entropy(dense["ref_logits"])[rollout.response_mask].median())
    results = {}
    for (name, (overrides, spec)), kernels in itertools.product(CASES.items(), KERNELS):
        config = tiny_config(f"segmentation.entropy_cutoff={cutoff}", *overrides)
        plan = resolve_reward_plan(config)
        sources = ExperienceSources(actor=actor, reference=reference, critic=critic,
                                    scorer=RewardModelScorer(reward_model, ctx, micro_batch_size=3),
                                    normalizer=_normalizer(spec, plan.segmentation.mode),
                                    sentence_marker=sentence_marker_every_7th)
        with kernels_mode(kernels):
            experience = make_experience(rollout, sources, plan, config.ppo, KL_COEF, ctx, PhaseTimer())
        got = {field: getattr(experience, field) for field in (*FIELDS, "segment_ends", "advantages")}
        results[name, kernels] = dict(got, config=config)
    return rollout, dense, cutoff, results


@pytest.fixture(scope="module")
def computed():
    (value,) = run_distributed(_run_cases, 1, timeout=400)
    return value


def _settings(config, spec: str, cutoff: float) -> ref.Settings:
    if spec == "location":
        normalizer = ("location", LOCATION["w_mu"], LOCATION["b_mu"], LOCATION["w_sigma"], LOCATION["b_sigma"],
                      LOCATION["p_min"])
    elif spec == "none":
        normalizer = ("none",)
    else:
        normalizer = ("scalar", SCALAR["mean"], SCALAR["std"])
    sequence_level = config.ppo.reward_granularity in ("bandit", "segment_as_bandit")
    return ref.Settings(mode=config.segmentation.mode, sequence_level=sequence_level, cutoff=cutoff,
                        n=config.segmentation.ngram_size, aggregation=config.rm.aggregation, normalizer=normalizer,
                        interpolation=config.ppo.interpolation, clip=config.ppo.reward_clip, kl_coef=KL_COEF,
                        gamma=config.ppo.gamma, lam=config.ppo.lam)


def _reference_rows(rollout, dense, settings) -> list[dict]:
    marks = sentence_marker_every_7th(rollout)
    rows = []
    for row in range(rollout.batch_size):
        length = int(rollout.attention_mask[row].sum())
        prompt_length = int((rollout.attention_mask[row] & ~rollout.response_mask[row]).sum())
        inputs = ref.RowInputs(
            ids=rollout.input_ids[row, :length].tolist(), prompt_length=prompt_length,
            response_length=length - prompt_length, has_eos=bool(rollout.eos_mask[row].any()),
            actor_logits=dense["actor_logits"][row, :length].double().tolist(),
            ref_logits=dense["ref_logits"][row, :length].double().tolist(),
            critic_head=dense["critic_head"][row, :length].double().tolist(),
            rm_head=dense["rm_head"][row, :length].double().tolist(), sentence_flags=marks[row, :length].tolist())
        rows.append(ref.experience_row(inputs, settings))
    return rows


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", list(CASES))
def test_every_phase_matches_the_per_sequence_reference(computed, name, kernels):
    rollout, dense, cutoff, results = computed
    got = results[name, kernels]
    settings = _settings(got["config"], CASES[name][1], cutoff)
    rows = _reference_rows(rollout, dense, settings)
    whitened = ref.whiten_batch(rows)
    for row, expected in enumerate(rows):
        length = len(expected["log_probs"])
        assert got["segment_ends"][row, :length].tolist() == expected["segment_ends"], (name, row)
        for field in FIELDS:
            actual = got[field][row, :length].double()
            torch.testing.assert_close(actual, torch.tensor(expected[field], dtype=torch.float64), rtol=1e-4,
                                       atol=2e-5, msg=lambda m: f"{name} {kernels} row {row} {field}: {m}")
        torch.testing.assert_close(got["advantages"][row, :length].double(),
                                   torch.tensor(whitened[row], dtype=torch.float64), rtol=1e-4, atol=2e-5)
        # Nothing after the response: padding columns carry no reward, KL, value or advantage.
        for field in ("token_rewards", "kl", "rewards", "advantages", "returns", "values"):
            assert not got[field][row, length:].any(), (name, row, field)


@pytest.mark.parametrize("name", list(CASES))
def test_the_kernels_give_the_torch_results(computed, name):
    """Beyond both matching the reference to its tolerance: the fused kernels agree with the torch phases to float
    rounding, field by field (segment ends exactly)."""
    _, _, _, results = computed
    torch_run, triton_run = results[name, "torch"], results[name, "triton"]
    assert torch.equal(torch_run["segment_ends"], triton_run["segment_ends"])
    for field in (*FIELDS, "advantages"):
        torch.testing.assert_close(triton_run[field], torch_run[field], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} {field}: {m}")


def test_the_cases_exercise_what_they_claim(computed):
    rollout, dense, cutoff, results = computed
    results = {name: got for (name, kernels), got in results.items() if kernels == "torch"}
    ends = results["segment-location-even"]["segment_ends"]
    # Entropy segments: more than one segment on the long row, EOS never an end except on the EOS-only row.
    assert int(ends[3].sum()) > 1
    assert not (ends & rollout.eos_mask)[[0, 1, 3]].any() and bool((ends & rollout.eos_mask)[2].any())
    clipped = results["segment-last-none-clipped"]["token_rewards"]
    assert float(clipped.abs().max()) == pytest.approx(0.1)
    # Sequence-level rewards sit on the last token only.
    bandit = results["bandit"]["token_rewards"]
    assert int((bandit != 0).sum()) == rollout.batch_size
    assert math.isfinite(float(results["segment-as-bandit-sum"]["advantages"].sum()))
