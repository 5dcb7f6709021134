"""Test setup for megaseg.algorithms.

The helper modules of this directory (algo_reference, algo_strategies) are imported by name, so the directory is put
on sys.path here; that works under pytest's default "prepend" import mode and under "importlib" alike. Their names
carry an ``algo_`` prefix, and the test files a ``test_algo_`` prefix, so they cannot collide with same-named modules
of other test directories (tests/ has no __init__.py files).
"""

import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# Moderate example counts keep the whole directory well under a minute on 2 CPU cores; deadline off because the
# first call of a torch op (lazy init) can take much longer than later ones.
settings.register_profile("megaseg-algorithms", max_examples=60, deadline=None, derandomize=False)
settings.load_profile("megaseg-algorithms")
