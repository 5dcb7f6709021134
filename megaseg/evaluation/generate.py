"""`megaseg generate --ckpt ACTOR --bench mt_bench|arena_hard|alpaca_eval [--prompts FILE] --out DIR
[--model-id NAME]`: the answer files MT-Bench's, Arena-Hard's and AlpacaEval's judges read (formats:
megaseg.evaluation.benchmarks).

The model: ``--ckpt`` names a megatron checkpoint (converted SFT model, a training step's ``actor/`` or ``policy/``,
a run's checkpoint root), found like `megaseg convert` finds it; its saved model config (megaseg_model.yaml or the
run's config.yaml) gives the architecture and tokenizer, explicit ``model.*`` settings on the command line win.
Without ``--ckpt``, ``model.checkpoint`` and the config's model section are used.

Generation: megaseg's KV-cache sampler (megaseg.generation) under the run's TP / PP / DP layout, ``generate.*``
settings (megaseg.config.evaluation: each benchmark's own defaults when left unset; MT-Bench's temperature by
category), the model's stop tokens (the chat template's end-of-answer token and ``model.eos_token_ids``). Prompts
are rendered with the model's chat template; one longer than ``generate.max_prompt_length`` (default: what fits
``model.max_position_embeddings`` with ``max_new_tokens``) is left out and reported (``generate.overlong_prompt=
skip``) or stops the run (``refuse``). MT-Bench's second turn is generated after every first turn, from the first
question, the model's own first answer and the second question.

Batches are fixed by the question list alone (grouped by temperature, ``generate.micro_batch_size`` questions
each, batch i on data-parallel rank i % dp); batch i samples with a generator seeded by (seed, turn, i). So the
answers do not depend on how often the run was interrupted.

Resumable: after every round of batches the answers so far are saved atomically to
``<out>/.progress/<model_id>.<bench>.json`` together with everything that decides them (checkpoint, questions,
settings); a restarted run with the same settings continues after the last saved round (other settings: an error
naming the file). The answer file is written (atomically) only once every question is answered.
The last line of output is one JSON object: the answer file, counts, skipped prompts, the settings used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megaseg.atomic_io import write_json_atomic, write_text_atomic
from megaseg.config import MegasegConfig
from megaseg.config.model import ModelConfig
from megaseg.evaluation.benchmarks import (
    DEFAULT_MAX_NEW_TOKENS,
    NUM_TURNS,
    Question,
    answer_file_text,
    answer_path,
    load_questions,
    question_temperature,
    turn_messages,
)

PROGRESS_DIR = ".progress"
_ROLE_DIRS = ("actor", "policy", "state")


def generation_model(config: MegasegConfig, explicit_keys: frozenset[str], ckpt: Optional[str]) -> ModelConfig:
    """The model section to generate with (module docstring)."""
    if ckpt is None:
        if config.model.checkpoint is None:
            raise ValueError("no model given: pass --ckpt DIR (a converted SFT model, a training step's actor/ or "
                             "policy/, or a run's checkpoint root)")
        return config.model
    from megaseg.config.loader import flat_settings
    from megaseg.conversion.megatron_to_hf import resolve_dist_checkpoint_dir
    from megaseg.conversion.model_yaml import find_model_config

    ckpt_dir = resolve_dist_checkpoint_dir(Path(ckpt)).absolute()
    found = find_model_config(ckpt_dir)
    model = found[0] if found is not None else config.model
    given = {key.split(".", 1)[1]: value for key, value in flat_settings(config).items()
             if key in explicit_keys and key.startswith("model.") and key.count(".") == 1}
    return dataclasses.replace(model, **given, checkpoint=str(ckpt_dir))


def default_model_id(checkpoint: str) -> str:
    """The checkpoint directory's name; a role directory (``step_000100/actor``) is named with its step and run."""
    path = Path(checkpoint)
    parts = [path.name]
    while parts[0] in _ROLE_DIRS or parts[0].startswith("step_") or parts[0] == "checkpoints":
        path = path.parent
        parts.insert(0, path.name)
    return "-".join(part for part in parts if part not in ("checkpoints", "state"))


@dataclass(frozen=True)
class GenerationPlan:
    bench: str
    model_id: str
    questions: list[Question]
    questions_path: str
    max_new_tokens: int
    max_prompt_length: int
    out_dir: Path

    @property
    def progress_path(self) -> Path:
        return self.out_dir / PROGRESS_DIR / f"{self.model_id}.{self.bench}.json"

    @property
    def answer_path(self) -> Path:
        return answer_path(self.bench, self.out_dir, self.model_id)


def plan_generation(config: MegasegConfig, model: ModelConfig, out: Optional[str]) -> GenerationPlan:
    settings = config.generate
    if settings.bench is None:
        raise ValueError("pass --bench mt_bench|arena_hard|alpaca_eval (generate.bench)")
    if out is None:
        raise ValueError("pass --out DIR, where the answer files go")
    if model.tokenizer is None:
        raise ValueError(f"the model at {model.checkpoint} names no tokenizer; set model.tokenizer")
    questions, path = load_questions(settings.bench, config.data.prompt_path, settings.max_prompts)
    max_new_tokens = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[settings.bench]
    room = model.max_position_embeddings - max_new_tokens
    max_prompt_length = settings.max_prompt_length or room
    if max_prompt_length > room or max_prompt_length < 1:
        raise ValueError(f"generate.max_prompt_length={max_prompt_length} + max_new_tokens={max_new_tokens} "
                         f"exceeds model.max_position_embeddings={model.max_position_embeddings}; lower "
                         "generate.max_new_tokens or generate.max_prompt_length")
    model_id = settings.model_id or default_model_id(model.checkpoint)
    if not model_id or "/" in model_id:
        raise ValueError(f"--model-id {model_id!r} must be a non-empty name without '/' (it names the answer file)")
    return GenerationPlan(bench=settings.bench, model_id=model_id, questions=questions, questions_path=path,
                          max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length, out_dir=Path(out))


def resume_key(config: MegasegConfig, model: ModelConfig, plan: GenerationPlan) -> dict[str, Any]:
    """Everything that decides the answers; a saved progress file continues only under the same key."""
    questions = hashlib.sha256(json.dumps([[q.key, list(q.turns)] for q in plan.questions]).encode()).hexdigest()
    settings = dataclasses.asdict(config.generate)
    settings.pop("micro_batch_size")  # part of the key below, through the batches it makes
    return {"bench": plan.bench, "model_id": plan.model_id, "checkpoint": model.checkpoint,
            "tokenizer": model.tokenizer, "eos_token_ids": list(model.eos_token_ids), "questions": questions,
            "max_new_tokens": plan.max_new_tokens, "max_prompt_length": plan.max_prompt_length, "seed": config.seed,
            "settings": settings, "micro_batch_size": config.generate.micro_batch_size}


def read_progress(plan: GenerationPlan, key: dict[str, Any]) -> dict[str, Any]:
    """The saved answers (``{"answers": {question key: {...}}, "skipped": {question key: reason}}``), empty when
    there is no progress file; ValueError when it was written under other settings."""
    path = plan.progress_path
    if not path.is_file():
        return {"key": key, "answers": {}, "skipped": {}}
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("key") != key:
        differing = sorted(name for name in set(key) | set(saved.get("key", {}))
                           if key.get(name) != saved.get("key", {}).get(name))
        raise ValueError(f"{path} holds answers generated with other settings ({', '.join(differing)}); delete it "
                         "to start over, or write to another --out")
    return saved


@dataclass(frozen=True)
class Batch:
    index: int
    turn: int
    temperature: float
    questions: list[Question]


def turn_batches(plan: GenerationPlan, config: MegasegConfig, turn: int, candidates: list[Question]) -> list[Batch]:
    """The fixed batches of one turn: questions grouped by temperature (first appearance), then chunked."""
    groups: dict[float, list[Question]] = {}
    for question in candidates:
        groups.setdefault(question_temperature(plan.bench, question, config.generate.temperature), []).append(question)
    size, batches = config.generate.micro_batch_size, []
    for temperature, members in groups.items():
        for start in range(0, len(members), size):
            batches.append(Batch(len(batches), turn, temperature, members[start:start + size]))
    return batches


def _say(text: str) -> None:
    from megaseg.parallel.collectives import is_rank_zero

    if is_rank_zero():
        print(f"[generate] {text}", file=sys.stderr, flush=True)


class AnswerGenerator:
    """Runs the batches of every turn (module docstring); the state is the progress record."""

    def __init__(self, config: MegasegConfig, model_cfg: ModelConfig, plan: GenerationPlan, parallel_ctx,
                 state: dict[str, Any]):
        from megaseg.checkpoint.sft import load_sft_language_model
        from megaseg.data.rendering import ChatTemplateRenderer
        from megaseg.data.tokenizer import load_tokenizer, padding_token_id

        self.config, self.plan, self.ctx, self.state = config, plan, parallel_ctx, state
        self.tokenizer = load_tokenizer(model_cfg.tokenizer)
        self.renderer = ChatTemplateRenderer(self.tokenizer, model_cfg.eos_token_ids)
        self.pad_token_id = padding_token_id(self.tokenizer)
        run_config = dataclasses.replace(config, model=model_cfg)
        self.model = load_sft_language_model(run_config, "generate", frozen=True)

    def _turn_candidates(self, turn: int) -> list[Question]:
        """The questions whose turn ``turn`` is asked: every one for the first turn, then those with every earlier
        turn answered (a question skipped at this very turn stays, so that the batches come out the same)."""
        answers = self.state["answers"]
        return [q for q in self.plan.questions if turn == 0 or len(answers.get(q.key, {}).get("turns", [])) >= turn]

    def _finished(self, question: Question, turn: int) -> bool:
        skipped = self.state["skipped"].get(question.key)
        return (len(self.state["answers"].get(question.key, {}).get("turns", [])) > turn
                or (skipped is not None and skipped["turn"] == turn))

    def _encode(self, question: Question, turn: int) -> Optional[tuple[int, ...]]:
        """The prompt ids of ``question``'s turn, or None after recording it as skipped (too long)."""
        previous = self.state["answers"].get(question.key, {}).get("turns", [])[:turn]
        ids = self.renderer.prompt_ids(turn_messages(question, list(previous)))
        if len(ids) <= self.plan.max_prompt_length:
            return ids
        reason = (f"turn {turn + 1} prompt has {len(ids)} tokens > generate.max_prompt_length="
                  f"{self.plan.max_prompt_length}")
        if self.config.generate.overlong_prompt == "refuse":
            raise ValueError(f"{question.source}: question {question.key}: {reason} (generate.overlong_prompt="
                             "refuse; raise the limit or set generate.overlong_prompt=skip)")
        self.state["skipped"][question.key] = {"turn": turn, "reason": reason, "source": question.source}
        _say(f"skipping question {question.key} ({question.source}): {reason}")
        return None

    def _run_batch(self, batch: Batch, prompts: list) -> dict[str, tuple[str, int]]:
        import torch

        from megaseg.data.batch import collate_prompts
        from megaseg.generation import SamplingSettings, generate

        settings = SamplingSettings(max_new_tokens=self.plan.max_new_tokens,
                                    stop_token_ids=self.renderer.stop_token_ids, temperature=batch.temperature,
                                    top_p=self.config.generate.top_p, top_k=self.config.generate.top_k,
                                    greedy=batch.temperature == 0.0)
        generator = None
        if not settings.is_greedy:
            seed = int(self.config.seed) * 1_000_003 + batch.turn * 7_919 + batch.index + 1
            generator = torch.Generator(device=self.ctx.device).manual_seed(seed)
        output = generate(self.model, collate_prompts(prompts, self.pad_token_id), settings, self.ctx,
                          pad_token_id=self.pad_token_id, generator=generator, backend=self.config.generate.backend)
        stops = set(self.renderer.stop_token_ids)
        results = {}
        for prompt, ids, stopped in zip(prompts, output.response_token_ids(), output.stopped_mask.tolist()):
            if stopped and ids and ids[-1] in stops:
                ids = ids[:-1]
            results[prompt.id] = (self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids))
        return results

    def run_turn(self, turn: int, progress) -> None:
        from megaseg.data.encoding import TokenizedPrompt
        from megaseg.parallel.collectives import is_rank_zero, merge_dicts_across_ranks

        batches = []
        for batch in turn_batches(self.plan, self.config, turn, self._turn_candidates(turn)):
            if all(self._finished(q, turn) for q in batch.questions):
                continue  # answered before an interruption (saved rounds hold whole batches)
            kept = [(q, ids) for q in batch.questions if (ids := self._encode(q, turn)) is not None]
            if kept:
                batches.append((batch, [TokenizedPrompt(id=q.key, source=q.source, prompt_ids=ids)
                                        for q, ids in kept]))
        answers = self.state["answers"]
        dp, rank = self.ctx.dp_size, self.ctx.dp_rank
        reports = self.ctx.tp_rank == 0 and self.ctx.is_last_pipeline_stage
        for start in range(0, len(batches), dp):
            local = {}
            if start + rank < len(batches):
                results = self._run_batch(*batches[start + rank])
                local = results if reports else {}
            merged = merge_dicts_across_ranks(local)
            now = time.time()
            for key, (text, num_tokens) in merged.items():
                answer = answers.setdefault(key, {"turns": [], "token_lens": [], "tstamp": now})
                answer["turns"].append(text)
                answer["token_lens"].append(num_tokens)
                answer["tstamp"] = now
            if is_rank_zero():
                self.plan.progress_path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.plan.progress_path, self.state)
            progress.update(self.num_answered())

    def num_answered(self) -> int:
        return sum(len(a["turns"]) for a in self.state["answers"].values())


def generate_answers(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset(), ckpt: Optional[str] = None,
                     out: Optional[str] = None, parallel_ctx=None) -> dict[str, Any]:
    """Generate (or finish) the answer file; returns the summary. Collective."""
    from megaseg.parallel import parallel_session
    from megaseg.parallel.collectives import is_rank_zero
    from megaseg.progress import Progress

    model_cfg = generation_model(config, explicit_keys, ckpt)
    plan = plan_generation(config, model_cfg, out)
    key = resume_key(config, model_cfg, plan)
    state = read_progress(plan, key)
    num_turns = NUM_TURNS[plan.bench]
    with parallel_session(dataclasses.replace(config, model=model_cfg), parallel_ctx) as context:
        generator = AnswerGenerator(config, model_cfg, plan, context, state)
        done_before = generator.num_answered()
        if done_before:
            _say(f"resuming from {plan.progress_path}: {done_before} answers saved")
        progress = Progress(f"generate {plan.bench}", len(plan.questions) * num_turns, unit="answers")
        progress.update(done_before)
        for turn in range(num_turns):
            generator.run_turn(turn, progress)
        progress.close()
    answers = {k: a for k, a in state["answers"].items() if k not in state["skipped"] and len(a["turns"]) == num_turns}
    summary = {"answers": str(plan.answer_path), "bench": plan.bench, "model_id": plan.model_id,
               "num_questions": len(plan.questions), "num_answered": len(answers),
               "skipped": state["skipped"], "questions": plan.questions_path, "checkpoint": model_cfg.checkpoint,
               "max_new_tokens": plan.max_new_tokens, "max_prompt_length": plan.max_prompt_length,
               "progress": str(plan.progress_path)}
    if is_rank_zero():
        plan.answer_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(plan.answer_path, answer_file_text(plan.bench, plan.model_id, plan.questions, answers))
    return summary


def generate_command(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset(), ckpt: Optional[str] = None,
                     out: Optional[str] = None) -> int:
    from megaseg.parallel.collectives import is_rank_zero

    summary = generate_answers(config, explicit_keys, ckpt, out)
    if is_rank_zero():
        print(json.dumps(summary), flush=True)
    return 0
