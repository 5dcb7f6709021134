"""Shared by the segmentation / scoring / calibration / evaluation tests: a tiny real tokenizer, random pairs, tiny
megatron models, and slow per-sequence references written from the method's conventions (not from megaseg code)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megaseg.config import MegasegConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.data.encoding import TokenizedPair, TokenizedSequence
from megaseg.data.resources import shipped_path

TINY_VOCAB = 512
SENTENCE_MARKS = (".", "!", "?", "\n", ";", "...", ",", ":", "。", "！", "？", "；", "，", "：")
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def build_tiny_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer of TINY_VOCAB tokens trained on the shipped HH-RLHF text, with a ChatML template
    (<|im_end|> ends an answer). Deterministic; takes well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(shipped_path("hh_rlhf_harmless/pairs.jsonl"), encoding="utf-8") as handle:
        for line in list(handle)[:400]:
            record = json.loads(line)
            texts.extend(message["content"] for message in record["chosen"] + record["rejected"][-1:])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def write_pairs_file(path: Path, num_pairs: int, start: int = 0) -> Path:
    """The first pairs of the shipped HH-RLHF slice, as a conversational jsonl file."""
    with open(shipped_path("hh_rlhf_harmless/pairs.jsonl"), encoding="utf-8") as handle:
        lines = list(handle)[start:start + num_pairs]
    path.write_text("".join(lines))
    return path


def random_pairs(num_pairs: int, *, vocab: int = 128, eos_id: int = 127, seed: int = 0) -> list[TokenizedPair]:
    """Pairs sharing a prompt, responses of 1..30 tokens; most end with EOS, some are truncated, one is EOS alone."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(num_pairs):
        prompt = tuple(int(x) for x in rng.integers(1, eos_id, rng.integers(2, 12)))
        sides = []
        for side in range(2):
            response = tuple(int(x) for x in rng.integers(1, eos_id, rng.integers(1, 30)))
            has_eos = bool(rng.random() < 0.8)
            if index == 1 and side == 1:
                response, has_eos = (), True  # EOS alone
            sides.append(TokenizedSequence(prompt, response + ((eos_id,) if has_eos else ()), has_eos))
        pairs.append(TokenizedPair(f"pair-{index}", f"random:{index}", sides[0], sides[1]))
    return pairs


def reference_ends(sequence: TokenizedSequence, mode: str, *, entropies: Optional[Sequence[float]] = None,
                   cutoff: Optional[float] = None, n: Optional[int] = None,
                   texts: Optional[Sequence[str]] = None) -> list[int]:
    """Segment end positions of ONE sequence, a plain loop over docs/method.md."""
    start, length = len(sequence.prompt_ids), len(sequence.response_ids)
    num_content = length - int(sequence.ends_with_eos)
    if mode == "bandit" or num_content == 0:
        return [start + length - 1]
    ends = []
    for k in range(num_content):
        if mode == "token":
            is_end = True
        elif mode == "entropy":
            is_end = entropies[k] > cutoff
        elif mode == "ngram":
            is_end = (k + 1) % n == 0
        elif mode == "sentence":
            is_end = texts[k].rstrip(" \t").endswith(SENTENCE_MARKS)
        else:
            raise AssertionError(mode)
        if is_end or k == num_content - 1:
            ends.append(start + k)
    return ends


def release_checkpoint_writer() -> None:
    """Shut down the multiprocessing Manager that megatron's dist_checkpointing starts on the first save.

    run_distributed terminates a rank right after it reports, before the rank's exit handlers would stop that
    Manager, so without this every saving test leaves a ~280 MB orphan process behind."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None


def tiny_config(cache_dir: str, *, tp: int = 1, vocab: int = 128, checkpoint: Optional[str] = None,
                **segmentation) -> MegasegConfig:
    base = MegasegConfig()
    model = dataclasses.replace(base.model, vocab_size=vocab, checkpoint=checkpoint)
    return dataclasses.replace(base, model=model, parallel=ParallelConfig(tensor_model_parallel_size=tp),
                               segmentation=dataclasses.replace(base.segmentation, cache_dir=cache_dir,
                                                                **segmentation))


def sharpen(model: torch.nn.Module, scale: float = 4.0) -> None:
    """Scale the (tied) embedding so a random tiny model's entropies spread over a wide range instead of sitting at
    log(vocab) (at 4.0, vocab 128: about 1.8 to 4.0 nats, median 2.95); every TP rank scales its own shard. Under
    pipeline parallelism the last stage holds its own copy of the tied embedding as the output layer, scaled there."""
    with torch.no_grad():
        if model.pre_process:
            model.embedding.word_embeddings.weight.mul_(scale)
        elif model.post_process:
            model.output_layer.weight.mul_(scale)


def dense_entropies(model: torch.nn.Module, sequence: TokenizedSequence) -> torch.Tensor:
    """Entropy at every position of one unpadded sequence, from the model's full logits (TP=1), plain torch."""
    ids = torch.tensor([sequence.prompt_ids + sequence.response_ids])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def gap_cutoff(values: np.ndarray) -> float:
    """A cutoff near the median of ``values`` in the widest gap around it, so no value sits near it and an
    entropy that differs in the last bits (another TP layout) cannot flip a boundary."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    window = range(max(1, middle - len(ordered) // 4), min(len(ordered), middle + len(ordered) // 4))
    best = max(window, key=lambda i: ordered[i] - ordered[i - 1])
    return float((ordered[best] + ordered[best - 1]) / 2)


# --- a trained-looking reward model on disk, for the fit-normalizer / eval-rm command tests ---------------------

FIXTURE_PAIRS = 14
FIXTURE_MAX_LENGTH, FIXTURE_MAX_PROMPT = 80, 56


def _fixture_config(root: Path, cutoff: float) -> MegasegConfig:
    base = MegasegConfig()
    model = dataclasses.replace(base.model, name="tiny-test-rm", vocab_size=TINY_VOCAB, tokenizer=str(root / "tok"),
                                checkpoint=str(root / "sft"))
    data = dataclasses.replace(base.data, train_path=str(root / "pairs.jsonl"), max_length=FIXTURE_MAX_LENGTH,
                               max_prompt_length=FIXTURE_MAX_PROMPT)
    segmentation = dataclasses.replace(base.segmentation, entropy_cutoff=cutoff, cache_dir=str(root / "cache"))
    return dataclasses.replace(base, model=model, data=data, segmentation=segmentation)


def _build_command_fixture(rank: int, world_size: int, root: str) -> dict:
    """SFT checkpoint + reward-model directory + the slow reference scores of every pair (by hand, one sequence per
    forward: dense entropies -> per-sequence segmentation loop -> head values at the ends -> mean)."""
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.data.encoding import encode_preference_pairs
    from megaseg.data.preference import load_preference_pairs
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.tokenizer import load_tokenizer
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.scalar_head import build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.checkpoint.step_dirs import TrainingProgress
    from megaseg.checkpoint.reward_model_dir import save_reward_model

    root_path = Path(root)
    config = _fixture_config(root_path, cutoff=0.0)
    initialize_parallel(config.parallel, seed=21)
    sft = build_gpt_model(config.model, config.parallel)
    sharpen(sft, 3.0)
    sft.eval()
    save_model_checkpoint(sft, root_path / "sft")
    renderer = ChatTemplateRenderer(load_tokenizer(config.model.tokenizer))
    loaded = load_preference_pairs(config.data.train_path)
    pairs = encode_preference_pairs(loaded.pairs, renderer, max_length=FIXTURE_MAX_LENGTH,
                                    max_prompt_length=FIXTURE_MAX_PROMPT).pairs
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    entropies = [dense_entropies(sft, s)[len(s.prompt_ids):].float().numpy() for s in sequences]
    cutoff = gap_cutoff(np.concatenate([e[:len(e) - s.ends_with_eos] for e, s in zip(entropies, sequences)]))
    config = _fixture_config(root_path, cutoff)
    reward_model = build_reward_model(config.model, config.parallel, seed=7)
    with torch.no_grad():
        reward_model.head.weight.normal_()  # spread the rewards: the init head is nearly constant
    reward_model.eval()
    rewards, positions, sequence_rewards, covered = [], [], [], []
    for sequence, values in zip(sequences, entropies):
        ends = reference_ends(sequence, "entropy", entropies=values, cutoff=cutoff)
        covered.append(ends[-1] - len(sequence.prompt_ids) + 1)
        ids = torch.tensor([sequence.prompt_ids + sequence.response_ids])
        with torch.no_grad():
            head = reward_model(ids, torch.arange(ids.shape[1])[None], None)[0].double().numpy()
        rewards.append(head[ends].tolist())
        positions.append([(t + 1) / len(ends) for t in range(len(ends))])
        sequence_rewards.append(float(np.mean(head[ends])))
    save_reward_model(root_path / "rm", model=reward_model, config=config, progress=TrainingProgress(step=3))
    release_checkpoint_writer()
    return {"cutoff": cutoff, "rewards": rewards, "positions": positions, "sequence_rewards": sequence_rewards,
            "num_pairs": len(pairs), "segment_counts": [len(r) for r in rewards], "covered": covered}


def command_fixture(base_temp: Path) -> tuple[Path, dict]:
    """Built once per test session under ``base_temp`` (shared by the calibrate and evaluate test modules)."""
    from megaseg.parallel.spawn import run_distributed

    root = base_temp / "rm-command-fixture"
    marker = root / "reference.json"
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        build_tiny_tokenizer(root / "tok")
        write_pairs_file(root / "pairs.jsonl", FIXTURE_PAIRS)
        (reference,) = run_distributed(_build_command_fixture, 1, str(root), timeout=300)
        marker.write_text(json.dumps(reference))
    return root, json.loads(marker.read_text())


def run_cli(*args: str, timeout: float = 300) -> "subprocess.CompletedProcess":
    """`python -m megaseg.cli <args>` in a fresh interpreter (the commands initialise torch.distributed)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megaseg.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])
