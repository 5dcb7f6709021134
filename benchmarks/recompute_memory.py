"""Peak memory of one forward/backward with and without activation recompute (model.recompute_*), each measured in a
fresh process as the resident-set high-water mark over the resident set before the step (megaseg.planning.measure),
beside the planner's activation term for the same setting.

    .venv/bin/python benchmarks/recompute_memory.py [--config model_configs/smollm2-135m-instruct.yaml]
        [--seq 512] [--batch 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# The script's own folder (sys.path[0]) holds kernels.py, which would shadow the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from megaseg.config import load_config  # noqa: E402
from megaseg.planning.measure import measure_activation_peak  # noqa: E402
from megaseg.planning.memory import CPU_KERNELS, Layout, Recompute, stage_activation_bytes  # noqa: E402

SETTINGS = (Recompute(), Recompute("selective"), Recompute("full", "uniform", 1), Recompute("full", "block", 1))
MIB = 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="model_configs/smollm2-135m-instruct.yaml")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    base = dataclasses.replace(load_config(args.config).model, random_init=True, checkpoint=None)
    print(f"{base.name}: {args.batch} x {args.seq} tokens, {base.num_layers} layers, {base.params_dtype}")
    print(f"{'recompute':18}{'measured peak MiB':>19}{'planned MiB':>13}{'planned/measured':>18}")
    for recompute in SETTINGS:
        model_cfg = dataclasses.replace(base, recompute_granularity=recompute.granularity,
                                        recompute_method=recompute.method, recompute_num_layers=recompute.num_layers)
        measured = measure_activation_peak(model_cfg, args.seq, args.batch).activation_peak_bytes
        planned = stage_activation_bytes(model_cfg, args.seq, args.batch, Layout(1, 1, 1), recompute, CPU_KERNELS, 1)
        print(f"{recompute.describe():18}{measured / MIB:19.0f}{planned / MIB:13.0f}{planned / measured:18.2f}",
              flush=True)


if __name__ == "__main__":
    main()
