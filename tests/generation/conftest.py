"""Test setup for megaseg.generation.

The helper modules of this directory (gen_reference, gen_scenarios) are imported by name, so the directory is put on
sys.path here (spawned ranks inherit the parent's sys.path). Names carry a ``gen_`` prefix, test files a
``test_gen_`` prefix, so they cannot collide with helpers of other test directories (tests/ has no __init__.py).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def dense_run():
    """The single-process (TP=1, PP=1) scenario, spawned once and shared by the sampler and parallel tests."""
    from gen_scenarios import single_process

    from megaseg.parallel.spawn import run_distributed

    (result,) = run_distributed(single_process, 1)
    return result
