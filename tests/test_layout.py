"""The package layout the README describes holds: trainers only under megaseg/training (each in its own package),
megatron driven from models/ and parallel/ only, every CLI command resolves to a real function, and no docstring
cites a document the repository does not ship."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megaseg"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_training_holds_only_trainers():
    top_level = sorted(path.name for path in (PACKAGE / "training").iterdir() if not path.name.startswith("__py"))
    assert top_level == ["__init__.py", "common", "dpo", "ppo", "reward_model"]


def test_trainers_never_touch_the_cpu_shim():
    for path in sorted((PACKAGE / "training").rglob("*.py")):
        shim = {name for name in _imports(path) if "cpu_compat" in name or name.endswith("cuda_device_redirect")}
        assert not shim, f"{path.relative_to(REPO)} imports {shim}: drive megatron through megaseg.models"


def test_every_command_names_a_real_function():
    from megaseg.cli import COMMANDS

    for command in COMMANDS:
        module, function = command.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), command.name


def test_cited_documents_ship_with_the_repository():
    cited = re.compile(r"(?<![\w/.])((?:docs|examples|megaseg|benchmarks|scripts)/[\w./-]+\.(?:md|yaml|py|sh))")
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(REPO.glob("*.md")) + sorted((REPO / "docs").rglob("*.md")):
        text = path.read_text()
        assert "shared/notes" not in text, f"{path.relative_to(REPO)} cites ../shared/notes, which users do not have"
        for name in cited.findall(text):
            assert (REPO / name).exists(), f"{path.relative_to(REPO)} cites {name}, which is not in the repository"
