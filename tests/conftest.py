"""Shared test helpers (tiny configs, reference implementations) live in tests/helpers/, importable by name from every
test folder and from the ranks that megaseg.parallel.spawn starts (they inherit sys.path)."""
import sys
from pathlib import Path

HELPERS = str(Path(__file__).resolve().parent / "helpers")
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
