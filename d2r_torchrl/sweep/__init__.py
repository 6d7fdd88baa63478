"""Sweeps of methods x benchmarks x seeds on a Ray cluster (``python -m d2r_torchrl.sweep``)."""
from d2r_torchrl.sweep.launcher import RunResult, run_resources, run_sweep, train_run
from d2r_torchrl.sweep.plan import PRESETS, SweepRun, plan_sweep, read_record

__all__ = ["PRESETS", "RunResult", "SweepRun", "plan_sweep", "read_record", "run_resources", "run_sweep", "train_run"]
