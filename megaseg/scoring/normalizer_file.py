"""The normalizer file of a reward model: where it lives, the metadata that ties it to the reward model, written by
`megaseg fit-normalizer` and checked by PPO, in this one module.

One vocabulary: ``normalizer.kind`` of the config is the ``"kind"`` field of the file (``NORMALIZER_KINDS``):
location (the paper's Mean(p) / Std(p)), global / last_segment / none (Table 5 ablations), bandit (scalar statistics
of sequence rewards).

One metadata rule (``normalizer_metadata``): model name, segmentation label (mode, with n for n-gram segments),
c_ent (entropy segments only) and aggregation. fit-normalizer records it from the config it scored under; PPO
computes it from the run's reward plan and the reward model's config and refuses a file whose metadata differ,
printing the ``megaseg fit-normalizer`` command that writes the right one. No silent (0, 1) fallback: kind none is the
only way to run without statistics, and it is asked for by name.

Integrity: the file carries ``content_sha256``, the sha256 of its other fields (canonical JSON), checked when read; a
truncated or altered file is an error naming it with the command that writes it again. A file without the field (
written by hand, e.g. from published coefficients) is read as it is.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from megaseg.algorithms.normalizer import IdentityNormalizer, Normalizer, normalizer_from_dict, segmentation_label
from megaseg.atomic_io import write_json_atomic
from megaseg.integrity import DamagedFileError, read_json_file
from megaseg.config import MegasegConfig
from megaseg.config.reward import NORMALIZER_KINDS
from megaseg.config.segmentation import SegmentationConfig

NORMALIZER_FILE = "normalizer.json"  # in the reward-model directory, unless normalizer.path names another file
CHECKSUM_FIELD = "content_sha256"


def content_checksum(content: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``content`` without its checksum field."""
    fields = {key: value for key, value in content.items() if key != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def normalizer_metadata(model_name: str, segmentation: SegmentationConfig, aggregation: str) -> dict[str, Any]:
    """What ties a normalizer to its reward model and the segmentation its rewards were scored at."""
    return {"model": model_name, "segmentation": segmentation_label(segmentation.mode, segmentation.ngram_size),
            "c_ent": float(segmentation.entropy_cutoff) if segmentation.mode == "entropy" else None,
            "aggregation": aggregation}


def normalizer_path(config: MegasegConfig, rm_dir: str | os.PathLike) -> Path:
    """normalizer.path when set, else <rm dir>/normalizer.json (where `megaseg fit-normalizer` writes)."""
    return Path(config.normalizer.path) if config.normalizer.path is not None else Path(rm_dir) / NORMALIZER_FILE


def write_normalizer(path: Path, normalizer: Normalizer, calibration: dict[str, Any]) -> Path:
    """The normalizer with its calibration record, atomically (call on one rank)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.loads(json.dumps({**normalizer.to_dict(), "calibration": calibration}, default=str))
    return write_json_atomic(path, {**content, CHECKSUM_FIELD: content_checksum(content)})


def read_normalizer_file(path: Path, repair: str) -> Normalizer:
    """The normalizer in ``path``, its checksum verified; ValueError naming the file and ``repair`` otherwise."""
    content = read_json_file(path, "a reward normalizer", repair)
    if isinstance(content, dict) and CHECKSUM_FIELD in content and content[CHECKSUM_FIELD] != content_checksum(content):
        raise DamagedFileError(path, f"does not hold what was written (its fields do not match its {CHECKSUM_FIELD}; "
                                     "if you edited it on purpose, delete that field)", repair)
    try:
        return normalizer_from_dict(content)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid normalizer ({error}). {repair}") from None


def fit_normalizer_hint(config: MegasegConfig, rm_dir: str | os.PathLike, rm_config: MegasegConfig,
                        calibrate_at: Optional[SegmentationConfig] = None) -> str:
    """The command line that writes the normalizer ``config`` needs for the reward model in ``rm_dir``.

    ``calibrate_at``: a segmentation other than the reward model's to score the calibration set at (a bandit RM
    read at entropy segment ends, "bandit as segment")."""
    data = rm_config.data.train_path or "<calibration preference file>"
    parts = [f"megaseg fit-normalizer --ckpt {rm_dir} --data {data}", f"normalizer.kind={config.normalizer.kind}"]
    if calibrate_at is not None:
        parts += [f"segmentation.mode={calibrate_at.mode}",
                  f"segmentation.entropy_cutoff={calibrate_at.entropy_cutoff:g}"]
    path = normalizer_path(config, rm_dir)
    if path != Path(rm_dir) / NORMALIZER_FILE:
        parts.append(f"normalizer.path={path}")  # fit-normalizer writes there instead of <rm dir>/normalizer.json
    return " ".join(parts)


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(float(have), float(want))
    return have == want


def load_matching_normalizer(config: MegasegConfig, rm_dir: str | os.PathLike, rm_config: MegasegConfig, *,
                             expected: dict[str, Any], hint: str) -> Normalizer:
    """The normalizer ``config`` asks for (normalizer.kind, normalizer.path), checked against the ``expected``
    metadata (``normalizer_metadata``); ValueError with the ``hint`` command when it is missing or mismatched."""
    kind = config.normalizer.kind
    assert kind in NORMALIZER_KINDS, kind
    if kind == "none":
        return IdentityNormalizer(**expected)
    path = normalizer_path(config, rm_dir)
    if not path.is_file():
        raise ValueError(f"PPO needs the {kind} reward normalizer of {rm_dir}, but {path} does not exist. Create it "
                         f"with:\n  {hint}")
    normalizer = read_normalizer_file(path, f"Write it again with:\n  {hint}")
    if normalizer.kind != kind:
        raise ValueError(f"{path} holds a {normalizer.kind!r} normalizer, but normalizer.kind={kind!r}; write one "
                         f"with:\n  {hint}")
    mismatched = [f"{key}: file has {getattr(normalizer, key)!r}, run needs {value!r}"
                  for key, value in expected.items() if not _same(getattr(normalizer, key), value)]
    if mismatched:
        raise ValueError(f"{path} was calibrated for other settings ({'; '.join(mismatched)}); write the normalizer "
                         f"of this reward model with:\n  {hint}")
    return normalizer
