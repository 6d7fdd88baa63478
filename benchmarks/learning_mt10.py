"""Learning benchmark on MT10: D2R vs Soft Modularization vs MT-SAC, same budget and seeds.

    python benchmarks/learning_mt10.py --preset cpu --seeds 0 1      # about 70 min on 2 CPU cores
    python benchmarks/learning_mt10.py --preset gpu --seeds 0 1 2    # the reference budget (GPU)

A sweep (``python -m d2r_torchrl.sweep --preset mt10-learning-cpu|gpu --out
benchmarks/out/learning``): every (method, seed) is one run on a local Ray cluster, or on
the one at ``--address``; the same command skips finished runs and resumes interrupted
ones. Other sweep options (``--methods``, ``--address``, ``--cpus-per-run``, ``key=value``
overrides for every run) pass through. The folder then holds ``runs.md`` (status, wall
seconds, updates per run), ``curves.png`` and ``summary.md`` (IQM over seeds and tasks with
95% stratified bootstrap intervals, final values per task).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from d2r_torchrl.sweep.__main__ import main as sweep_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--out", default="benchmarks/out/learning")
    args, passed_on = parser.parse_known_args(argv)
    return sweep_main(["--preset", f"mt10-learning-{args.preset}", "--seeds", *args.seeds, "--out", args.out, *passed_on])


if __name__ == "__main__":
    sys.exit(main())
