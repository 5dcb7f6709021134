"""The config fit-normalizer and eval-rm score under: the reward model's training config, with the settings the user
gave on top (whatever their value, a schema default included); the architecture always from the checkpoint;
overriding the segmentation warns."""
import dataclasses
import warnings

import pytest

from megaseg.config import MegasegConfig
from megaseg.config.loader import explicit_keys
from megaseg.scoring.inputs import scoring_config


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
    given = {"rm.checkpoint", "data.eval_path", "segmentation.cache_dir", "model.hidden_size", "model.tokenizer"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = scoring_config(command, _rm_config(), given)
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
        merged = scoring_config(command, _rm_config(), {"segmentation.mode"})
    assert merged.segmentation.mode == "bandit"


def test_a_given_setting_equal_to_the_schema_default_still_applies():
    # rm.aggregation=mean is the schema's default; given explicitly it must replace the reward model's "min".
    given = explicit_keys(None, ["rm.aggregation=mean"])
    assert given == {"rm.aggregation"}
    with pytest.warns(UserWarning, match="scoring with rm.aggregation='mean', but the reward model was trained with "
                                         "'min'"):
        merged = scoring_config(MegasegConfig(), _rm_config(), given)
    assert merged.rm.aggregation == "mean"
    # Not given: the reward model's own setting, although the command's config holds the default "mean" too.
    assert scoring_config(MegasegConfig(), _rm_config(), set()).rm.aggregation == "min"
