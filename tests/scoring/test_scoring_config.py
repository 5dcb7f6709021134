"""The config fit-normalizer and eval-rm score under: the reward model's training config, with the command's explicit
(non-default) settings on top; the architecture always from the checkpoint; overriding the segmentation warns."""
import dataclasses
import warnings

import pytest

from megaseg.config import MegasegConfig
from megaseg.scoring.setup import overlay_explicit, scoring_config


def _replace(config, **sections):
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **fields)
                                          for name, fields in sections.items()})


def _rm_config():
    return _replace(MegasegConfig(),
                    model={"name": "trained", "hidden_size": 32, "tokenizer": "/old/tok", "checkpoint": "/sft"},
                    segmentation={"mode": "ngram", "ngram_size": 3, "cache_dir": "/rm/cache"},
                    data={"train_path": "/train.jsonl", "max_length": 192, "max_prompt_length": 128,
                          "eval_fraction": 0.1},
                    rm={"aggregation": "min", "checkpoint": "/rm"})


def test_the_reward_models_settings_are_the_base():
    command = _replace(MegasegConfig(), rm={"checkpoint": "/rm"}, data={"eval_path": "/eval.jsonl"},
                       segmentation={"cache_dir": "/mine"}, model={"hidden_size": 4096, "tokenizer": "/moved/tok"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = scoring_config(command, _rm_config())
    assert not [w for w in caught if "scoring with" in str(w.message)]  # nothing that defines the scores changed
    assert merged.data.eval_path == "/eval.jsonl" and merged.data.eval_fraction == 0.0  # the file replaces the split
    assert (merged.data.train_path, merged.data.max_length) == ("/train.jsonl", 192)
    assert (merged.segmentation.mode, merged.segmentation.ngram_size) == ("ngram", 3)
    assert merged.segmentation.cache_dir == "/mine"
    assert merged.rm.aggregation == "min"
    assert merged.model.hidden_size == 32 and merged.model.name == "trained"  # the weights decide
    assert merged.model.tokenizer == "/moved/tok"  # a path may move


def test_overriding_the_segmentation_warns():
    command = _replace(MegasegConfig(), segmentation={"mode": "bandit"})
    with pytest.warns(UserWarning, match="scoring with segmentation.mode='bandit', but the reward model was trained "
                                         "with 'ngram'"):
        merged = scoring_config(command, _rm_config())
    assert merged.segmentation.mode == "bandit"


def test_overlay_recurses_and_keeps_untouched_sections():
    base, default = _rm_config(), MegasegConfig()
    assert overlay_explicit(base, default, default) is base
    merged = overlay_explicit(base, _replace(default, normalizer={"method": "ols"}), default)
    assert merged.normalizer.method == "ols" and merged.data is base.data
