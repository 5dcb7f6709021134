"""`megaseg compare --answers A --baseline B --reward-model RM`: a judge-free proxy of a pairwise benchmark.

Every question answered in both files is one comparison: the reward model scores both answers to the same prompt
(e(x, y), its own segmentation and aggregation, eval-rm's scoring path); A wins when e(x, y_A) > e(x, y_B), an exact
tie counts half (``compare.ties=half``, AlpacaEval's convention) or as a loss. Reported: the win rate of A over B (in
%, AlpacaEval's scale) with a percentile bootstrap 95% interval over the questions (``compare.num_bootstrap``
resamples, seeded by ``seed``), the mean score margin, both models' average answer lengths (characters, AlpacaEval's
length, and reward-model tokens), and the length-controlled win rate.

Length-controlled win rate (AlpacaEval 2.0, Dubois et al. 2024): a logistic model of the preference
``P(A wins) = sigmoid(w_len * tanh(delta / std(delta)) + w_A)`` with ``delta`` = baseline length - model length in
characters, fitted on the soft preferences (each comparison twice, labels 1 and 0 weighted by the preference) with
an L1 penalty whose strength is picked by 5-fold cross-validation over the questions (liblinear, no intercept, 10 C
values on 1e-4..1e4); the LC win rate is its prediction at zero length difference, ``100 * sigmoid(w_A)``. This is
alpaca_eval's ``length_controlled_minimal`` GLM. Its default ``length_controlled_v1`` adds a per-instruction
difficulty and a regularisation towards two "gamed" baselines, both estimated from GPT-4 annotations of the 805
AlpacaEval instructions that alpaca_eval downloads from the Hugging Face hub; neither exists for a reward-model
judge on arbitrary prompts. The test checks this function against alpaca_eval's own on the same inputs.

The reward model: a megaseg reward-model directory (`megaseg train-rm`), or a Hugging Face
``*ForSequenceClassification`` directory (an ordinary sequence-level reward model, e.g. one from RewardBench), which
scores each conversation rendered with its own chat template (``score_with_hf_classifier``). A megaseg reward model
exported to Hugging Face is a token classifier whose score needs megaseg's segmentation: pass its megaseg directory.

Inputs: answer files as `megaseg generate` writes them (an AlpacaEval outputs list, an MT-Bench or Arena-Hard
model_answer .jsonl; megaseg.evaluation.benchmarks.read_answer_file). AlpacaEval outputs carry their instruction;
MT-Bench / Arena-Hard answers carry question ids, whose prompts come from ``--prompts`` (default: the shipped set of
the file's benchmark). MT-Bench compares the first turn only: each model's second-turn prompt contains its own first
answer, so the two second answers do not answer the same prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megaseg.atomic_io import write_text_atomic
from megaseg.config import MegasegConfig
from megaseg.evaluation.benchmarks import Answer, load_questions, read_answer_file

LC_NUM_FOLDS = 5
LC_CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV's default grid (Cs=10)
LC_RANDOM_STATE = 123


# --- statistics -------------------------------------------------------------------------------------------------


def preferences_from_scores(model_scores: np.ndarray, baseline_scores: np.ndarray, ties: str = "half") -> np.ndarray:
    """[N] preference of the model over the baseline in [0, 1]: 1 win, 0 loss, a tie 0.5 (or 0 with ties=loss)."""
    preference = (model_scores > baseline_scores).astype(np.float64)
    if ties == "half":
        preference[model_scores == baseline_scores] = 0.5
    return preference


def bootstrap_interval(preferences: np.ndarray, num_resamples: int, seed: int,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean preference (in %), resampling the questions with replacement."""
    rng = np.random.default_rng(seed)
    n = len(preferences)
    means = preferences[rng.integers(0, n, size=(num_resamples, n))].mean(axis=1) * 100
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _continuous_log_loss(labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray) -> float:
    """alpaca_eval's ``logloss_continuous``: the duplicated rows' labels back to their soft targets."""
    targets = np.where(labels == 1, probabilities, 1 - probabilities)
    predicted = np.clip(predicted, 1e-15, 1 - 1e-15)
    return float(-np.mean(targets * np.log(predicted) + (1 - targets) * np.log(1 - predicted)))


def _fit(features: np.ndarray, labels: np.ndarray, weights: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, penalty="l1", solver="liblinear", fit_intercept=False,
                               random_state=LC_RANDOM_STATE)
    return model.fit(features, labels, sample_weight=weights)


def length_controlled_win_rate(preferences: np.ndarray, model_lengths: np.ndarray,
                               baseline_lengths: np.ndarray) -> dict[str, float]:
    """AlpacaEval 2.0's length-controlled win rate (module docstring): ``{"length_controlled_win_rate" (in %),
    "w_length", "w_model", "C"}``. ``preferences`` [N] in [0, 1]; lengths [N] in characters."""
    from sklearn.model_selection import GroupKFold

    preferences = np.asarray(preferences, dtype=np.float64)
    n = len(preferences)
    if n < LC_NUM_FOLDS:
        raise ValueError(f"the length-controlled win rate needs at least {LC_NUM_FOLDS} comparisons (its "
                         f"{LC_NUM_FOLDS}-fold cross-validation); got {n}")
    delta = np.asarray(baseline_lengths, dtype=np.float64) - np.asarray(model_lengths, dtype=np.float64)
    std = delta.std(ddof=1)
    length_feature = np.tanh(delta / std) if std > 0 else np.zeros(n)
    rows = np.column_stack([length_feature, np.ones(n)])
    # Each comparison twice: label 1 weighted by the preference, label 0 by its complement.
    features = np.concatenate([rows, rows])
    labels = np.concatenate([np.ones(n), np.zeros(n)]).astype(int)
    probabilities = np.concatenate([preferences, 1 - preferences])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    folds = list(GroupKFold(n_splits=LC_NUM_FOLDS).split(features, labels, groups))
    scores = []
    for c in LC_CS:
        total = 0.0
        for train, test in folds:
            model = _fit(features[train], labels[train], probabilities[train], c)
            total -= _continuous_log_loss(labels[test], model.predict_proba(features[test])[:, 1],
                                          probabilities[test])
        scores.append(total)
    best = float(LC_CS[int(np.argmax(scores))])
    w_length, w_model = _fit(features, labels, probabilities, best).coef_[0]
    return {"length_controlled_win_rate": float(100 / (1 + np.exp(-w_model))), "w_length": float(w_length),
            "w_model": float(w_model), "C": best}


# --- pairing the two files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    key: str
    prompt: str
    model_answer: str
    baseline_answer: str


def pair_answers(config: MegasegConfig, answers_path: str, baseline_path: str) -> tuple[str, list[Comparison],
                                                                                        dict[str, int]]:
    """(the bench, the comparisons in the model file's order, counts of answers found in one file only)."""
    bench, model_answers = read_answer_file(answers_path)
    baseline_bench, baseline_answers = read_answer_file(baseline_path)
    if bench != baseline_bench:
        raise ValueError(f"--answers {answers_path} holds {bench} answers but --baseline {baseline_path} holds "
                         f"{baseline_bench} answers; compare answers to the same benchmark")
    if config.generate.bench is not None and config.generate.bench != bench:
        raise ValueError(f"--bench {config.generate.bench} but the answer files hold {bench} answers")
    prompts: dict[str, str] = {}
    if bench != "alpaca_eval":
        questions, _ = load_questions(bench, config.data.prompt_path)
        prompts = {q.key: q.turns[0] for q in questions}
    baseline = {a.key: a for a in baseline_answers}

    def prompt_of(answer: Answer) -> str:
        if answer.prompt is not None:
            return answer.prompt
        if answer.key not in prompts:
            raise ValueError(f"question {answer.key} of {answers_path} is not in the question file "
                             f"{config.data.prompt_path or 'shipped for ' + bench}; pass the file the answers were "
                             "generated from with --prompts")
        return prompts[answer.key]

    comparisons = [Comparison(a.key, prompt_of(a), a.text, baseline[a.key].text)
                   for a in model_answers if a.key in baseline]
    model_keys = {a.key for a in model_answers}
    unmatched = {"only_in_answers": len(model_keys - set(baseline)), "only_in_baseline": len(set(baseline) - model_keys)}
    if not comparisons:
        raise ValueError(f"{answers_path} and {baseline_path} share no question; they answer different prompt sets")
    return bench, comparisons, unmatched


HF_CONFIG_FILE = "config.json"


def is_hf_sequence_classifier(path: Path) -> bool:
    """A Hugging Face directory of a ``*ForSequenceClassification`` model (an ordinary sequence-level reward model)."""
    config_file = Path(path) / HF_CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from None
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def score_with_hf_classifier(path: Path, comparisons: list[Comparison], max_length: int
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``score_comparisons`` for a Hugging Face sequence classifier: each conversation (user prompt, assistant
    answer) rendered with the model's own chat template, truncated to ``max_length`` tokens from the left of the
    prompt, scored by the model's first logit (transformers reads it at the last token). One process, CPU or the
    first GPU."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.chat_template is None:
        raise ValueError(f"--reward-model {path}: its tokenizer has no chat template to render the conversations")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    scores, tokens = np.zeros((len(comparisons), 2)), np.zeros((len(comparisons), 2), dtype=np.int64)
    with torch.no_grad():
        for index, comparison in enumerate(comparisons):
            for side, answer in enumerate((comparison.model_answer, comparison.baseline_answer)):
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": comparison.prompt}, {"role": "assistant", "content": answer}],
                    tokenize=True, return_dict=False)
                ids = list(ids)[-max_length:]
                scores[index, side] = float(model(torch.tensor([ids], device=device)).logits[0, 0])
                tokens[index, side] = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return scores[:, 0], scores[:, 1], tokens[:, 0], tokens[:, 1]


def score_comparisons(config: MegasegConfig, explicit_keys: frozenset[str], comparisons: list[Comparison],
                      source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(model scores [N], baseline scores [N], model token counts [N], baseline token counts [N]): e(x, y) of each
    answer by the reward model, through eval-rm's scoring (its config, segmentation cache and aggregation); or, for a
    Hugging Face sequence classifier, its score of each conversation. Collective."""
    if config.rm.checkpoint is not None and is_hf_sequence_classifier(Path(config.rm.checkpoint)):
        return score_with_hf_classifier(Path(config.rm.checkpoint), comparisons, config.data.max_length)
    from megaseg.data.encoding import encode_preference_pairs
    from megaseg.data.preference import PreferencePair
    from megaseg.parallel import parallel_session
    from megaseg.scoring.inputs import chat_renderer, reward_model_config, score_encoded_pairs

    rm_dir, rm_config = reward_model_config(config, explicit_keys)
    pairs = [PreferencePair(id=c.key, prompt_messages=[{"role": "user", "content": c.prompt}], chosen=c.model_answer,
                            rejected=c.baseline_answer, source=f"{source}:{c.key}") for c in comparisons]
    data = rm_config.data
    encoded = encode_preference_pairs(pairs, chat_renderer(rm_config), max_length=data.max_length,
                                      max_prompt_length=data.max_prompt_length, overlong_prompt=data.overlong_prompt,
                                      skip_invalid=False)
    with parallel_session(rm_config) as context:
        scored = score_encoded_pairs(rm_config, rm_dir, encoded, context)
    tokens = np.array([[len(p.chosen.response_ids), len(p.rejected.response_ids)] for p in encoded.pairs])
    return (scored.scores.chosen.sequence_rewards, scored.scores.rejected.sequence_rewards, tokens[:, 0],
            tokens[:, 1])


def comparison_summary(preferences: np.ndarray, margins: np.ndarray, model_chars: np.ndarray,
                       baseline_chars: np.ndarray, config: MegasegConfig) -> dict[str, Any]:
    low, high = bootstrap_interval(preferences, config.compare.num_bootstrap, config.seed)
    summary = {"win_rate": float(preferences.mean() * 100), "win_rate_ci95": [low, high],
               "num_comparisons": int(len(preferences)), "num_wins": int(np.sum(preferences == 1)),
               "num_losses": int(np.sum(preferences == 0)), "num_ties": int(np.sum(margins == 0)),
               "mean_margin": float(np.mean(margins)),
               "avg_length_chars": float(np.mean(model_chars)), "baseline_avg_length_chars": float(np.mean(baseline_chars))}
    if len(preferences) >= LC_NUM_FOLDS:
        summary.update(length_controlled_win_rate(preferences, model_chars, baseline_chars))
    else:
        summary["length_controlled_win_rate"] = None
    return summary


def compare_command(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset(), answers: Optional[str] = None,
                    baseline: Optional[str] = None, out: Optional[str] = None) -> int:
    """Entry of `megaseg compare`; the last line of output is the result JSON (``--out`` writes it too)."""
    from megaseg.parallel.collectives import is_rank_zero

    if answers is None or baseline is None:
        raise ValueError("compare needs --answers FILE (the model) and --baseline FILE")
    bench, comparisons, unmatched = pair_answers(config, answers, baseline)
    model_scores, baseline_scores, model_tokens, baseline_tokens = score_comparisons(
        config, explicit_keys, comparisons, answers)
    preferences = preferences_from_scores(model_scores, baseline_scores, config.compare.ties)
    model_chars = np.array([len(c.model_answer) for c in comparisons], dtype=np.float64)
    baseline_chars = np.array([len(c.baseline_answer) for c in comparisons], dtype=np.float64)
    summary = comparison_summary(preferences, model_scores - baseline_scores, model_chars, baseline_chars, config)
    summary.update({"avg_length_tokens": float(np.mean(model_tokens)),
                    "baseline_avg_length_tokens": float(np.mean(baseline_tokens)), "bench": bench,
                    "answers": str(answers), "baseline": str(baseline), "reward_model": str(config.rm.checkpoint),
                    "ties": config.compare.ties, "num_bootstrap": config.compare.num_bootstrap, **unmatched})
    if is_rank_zero():
        line = json.dumps(summary)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, line + "\n")
        print(line, flush=True)
    return 0
