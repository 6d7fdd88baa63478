"""``python -m d2r_torchrl.sweep [--methods ...] [--seeds ...] [--benchmarks ...] [key=value ...]``.

Trains every method x benchmark x seed with the method's reference preset and the given
overrides, each run one Ray task writing ``<out>/<method>_<benchmark>_seed<seed>/``, on a
local Ray cluster (default) or the one at ``--address``. The same command again skips
finished runs and resumes interrupted or failed ones from their checkpoints (and finished
ones, when ``collector.total_steps_per_task`` grew). Afterwards
``<out>/runs.md`` lists every run's status, and ``curves.png``, ``summary.md`` and
``summary.json`` aggregate the finished runs across seeds (IQM, stratified bootstrap).
Ctrl-C or SIGTERM stops every running run with a checkpoint. Exit code 1 when a run
failed, 130 when runs were interrupted.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

from d2r_torchrl.sweep.launcher import RunResult, run_sweep
from d2r_torchrl.sweep.plan import PRESETS, SweepRun, plan_sweep
from d2r_torchrl.training.config import ALGORITHMS, ConfigError, describe, preset
from d2r_torchrl.training.ray_collector import require_ray


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[SweepRun]]:
    """Command line -> (arguments, planned runs); raises :class:`ConfigError` on bad values."""
    parser = argparse.ArgumentParser(
        prog="python -m d2r_torchrl.sweep",
        description=__doc__,
        epilog="Presets: " + ", ".join(PRESETS) + ". Override any option as key=value "
        "(seed, log.root and log.name are set per run). Options and the d2r MT10 defaults:\n"
        + describe(preset("d2r", "MT10")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--preset", choices=list(PRESETS), help="named sweep: methods, benchmarks and overrides")
    parser.add_argument("--methods", nargs="+", choices=list(ALGORITHMS), help="default: the preset's, else d2r")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--benchmarks", nargs="+", help="MT10, MT50 or comma-separated task names (reach-v3,window-open-v3); default: the preset's, else MT10")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep folder (default runs/sweep)")
    parser.add_argument("--address", default="local", help="Ray cluster to join (HOST:PORT or auto); default: start a local one")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--cpus-per-run", type=float, help="Ray CPUs per run (default: 1, or the collector's workers)")
    parser.add_argument("--gpus-per-run", type=float, help="Ray GPUs per run (default: 1 when the run's device is CUDA)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples of the aggregation")
    args = parser.parse_args(argv)
    chosen = PRESETS.get(args.preset, {"methods": ("d2r",), "benchmarks": ("MT10",), "overrides": ()})
    runs = plan_sweep(
        args.out,
        args.methods or chosen["methods"],
        args.seeds,
        args.benchmarks or chosen["benchmarks"],
        [*chosen["overrides"], *args.overrides],
    )
    return args, runs


def _print_result(result: RunResult) -> None:
    record = result.record
    progress = f"{record.get('frames', 0):,} frames, {record.get('seconds', 0.0):.0f} s" if "frames" in record else ""
    print(f"{result.run.name}: {result.status} {progress} {result.error}".rstrip(), flush=True)


def write_runs_table(results: Sequence[RunResult], path: Path) -> Path:
    """``runs.md``: one row per run with its status, progress and error (on one line, cut
    at 300 characters; ``sweep.json`` in the run's folder keeps all of it)."""
    rows = [
        f"| {r.run.name} | {r.record.get('status', r.status)} | {r.record.get('frames', '')} | {r.record.get('updates', '')} "
        f"| {r.record.get('seconds', 0.0):.0f} | {' '.join(r.error.split())[:300]} |"
        for r in results
    ]
    path.write_text("\n".join(["| run | status | frames | updates | wall s | error |", "|---|---|---|---|---|---|", *rows]) + "\n")
    return path


def report(results: Sequence[RunResult], out: Path, reps: int) -> None:
    """Aggregate the finished runs of each group, if any, into ``out``."""
    from d2r_torchrl.analysis.aggregate import write_report

    groups: dict[str, list[Path]] = {}
    for result in results:
        if result.record.get("status") == "done":
            groups.setdefault(result.run.group, []).append(result.run.run_dir)
    if not groups:
        print("no finished run to aggregate")
        return
    try:
        write_report(groups, out, reps=reps)
    except (ImportError, ValueError) as error:
        print(f"aggregation skipped: {error}", file=sys.stderr)
        return
    print((out / "summary.md").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, runs = parse(argv)
        require_ray()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import ray

    try:
        ray.init(address=args.address, **({"num_cpus": args.num_cpus} if args.address == "local" else {}))
    except (ConnectionError, ValueError) as error:
        print(f"error: cannot start or join the Ray cluster at --address {args.address}: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop: like Ctrl-C (after ray.init's own)
    try:
        results = run_sweep(runs, args.cpus_per_run, args.gpus_per_run, on_result=_print_result)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"run table: {write_runs_table(results, args.out / 'runs.md')}")
    report(results, args.out, args.reps)
    if any(r.status == "interrupted" for r in results):
        print("interrupted runs are saved; the same command resumes them")
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
