"""Every shipped recipe fits the hardware its `# hardware:` header names (megaseg plan), and the Slurm scripts ask
for the node counts those headers give: model_configs/*.yaml, examples/paper/**/*.yaml, examples/paper/slurm/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megaseg.config import load_config
from megaseg.planning.plan import build_plan, read_hardware_header, resolve_hardware

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted([*REPO.glob("model_configs/*.yaml"), *REPO.glob("examples/paper/**/*.yaml")])
SCRIPTS = sorted(REPO.glob("examples/paper/slurm/*.sbatch"))
GIB = 2 ** 30


def test_the_recipes_are_found():
    assert len(RECIPES) >= 50 and len(SCRIPTS) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(path.relative_to(REPO)) for path in RECIPES])
def test_recipe_fits_the_hardware_its_header_names(recipe):
    header = read_hardware_header(recipe)
    assert header, f"{recipe} (or its base chain) names no `# hardware:` line"
    plan = build_plan(load_config(recipe), resolve_hardware(header))
    assert plan.fits, (f"{recipe}: {plan.per_rank_total_bytes / GIB:.1f} GiB per rank > "
                       f"{plan.hardware.gpu_memory_gib} GiB; largest {plan.largest_term()}")


def _sbatch_nodes(script: Path) -> int:
    match = re.search(r"^#SBATCH --nodes=(\d+)$", script.read_text(), re.MULTILINE)
    assert match, f"{script} sets no #SBATCH --nodes"
    return int(match.group(1))


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_slurm_scripts_ask_for_the_nodes_the_recipes_need(script):
    text = script.read_text()
    nodes = _sbatch_nodes(script)
    named = sorted(set(re.findall(r"examples/paper/[\w./-]+\.yaml", text)))
    if not named:  # reward_model.sbatch: BACKBONE's common.yaml with the overrides of its train-rm line
        train = next(line for line in text.splitlines() if "megaseg train-rm" in line)
        continuation = text[text.index(train):].split("\n\n")[0]
        overrides = [token for token in re.findall(r"\b([a-z_]+\.[\w.]+=[^\s\"]+)", continuation) if "$" not in token
                     and not token.startswith("data.train_path")]
        for backbone in ("phi3-mini", "llama3-8b"):
            config = load_config(REPO / f"examples/paper/{backbone}/common.yaml", overrides)
            plan = build_plan(config, resolve_hardware({"command": "train-rm", "nodes": nodes}))
            assert plan.fits, (script.name, backbone, plan.per_rank_total_bytes / GIB, plan.largest_term())
        return
    for relative in named:
        header = read_hardware_header(REPO / relative)
        # Either the script's default node count, or the `--nodes=N` its usage line gives for that recipe.
        assert header["nodes"] == nodes or f"--nodes={header['nodes']}" in text, (script.name, relative, header)
