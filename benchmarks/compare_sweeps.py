"""Compare two groups of finished runs: IQM success with 95% intervals at every evaluation point.

Each group is a list of run directories (e.g. the seeds of one sweep); the IQM pools every
(run, task) score at a point and the interval is rliable's stratified bootstrap over runs
(:func:`d2r_torchrl.analysis.aggregate.write_report`). Per run it lists the final success
of each task, the largest critic loss logged (a diverging critic shows there first), the
largest ``|Q|`` logged (``train/q_max``; ``-`` for runs without that log) and the wall
seconds of its ``sweep.json``. Writes ``comparison.md`` and ``comparison.json`` to ``--out``,
beside the final IQM of both metrics and their curves from
:func:`~d2r_torchrl.analysis.aggregate.write_report` (``summary.md``, ``curves.png``).

    python benchmarks/compare_sweeps.py --out benchmarks/runs/easy2/prioritized_vs_stratified \\
        --group stratified_prioritized benchmarks/runs/easy2/stratified_prioritized/d2r_*_seed? \\
        --group stratified benchmarks/runs/easy2/stratified/d2r_*_seed?
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2r_torchrl.analysis.aggregate import largest_logged_q, run_tasks, write_report  # noqa: E402
from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402


def run_status(run_dir: Path) -> str | None:
    """The ``status`` in a run's ``sweep.json`` (``done`` once finished); None without one."""
    record = run_dir / "sweep.json"
    return json.loads(record.read_text()).get("status") if record.exists() else None


def run_facts(run_dir: Path) -> dict:
    """Final success per task, largest logged critic loss and wall seconds of one run."""
    tasks = run_tasks(run_dir)
    success = {task: read_scalar_csv(run_dir / "scalars" / "eval" / "success" / f"{task}.csv")[1][-1] for task in tasks}
    record = json.loads((run_dir / "sweep.json").read_text())
    return {
        "final_success": success,
        "max_critic_loss": max(read_scalar_csv(run_dir / "scalars" / "train" / "loss_qvalue.csv")[1]),
        "max_abs_q": largest_logged_q(run_dir),
        "wall_seconds": record.get("seconds", 0.0),
    }


def compare(groups: dict[str, list[Path]], out: Path) -> dict:
    """The per-point IQM table of two groups, whether their intervals overlap, and the per-run facts."""
    first, second = groups
    success = {name: result["success"] for name, result in write_report(groups, out).items()}
    points = min(len(result["frames"]) for result in success.values())
    a, b = ({key: np.asarray(result[key][:points]) for key in ("iqm", "lower", "upper")} for result in success.values())
    summary = {
        "frames": success[first]["frames"][:points],
        "groups": {name: {key: values.tolist() for key, values in result.items()} for name, result in zip(groups, (a, b))},
        "overlap": (np.maximum(a["lower"], b["lower"]) <= np.minimum(a["upper"], b["upper"])).tolist(),
        "runs": {name: {str(run): run_facts(run) for run in runs} for name, runs in groups.items()},
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    (out / "comparison.md").write_text(_markdown(summary, first, second))
    return summary


def _markdown(summary: dict, first: str, second: str) -> str:
    def cell(name: str, i: int) -> str:
        s = summary["groups"][name]
        return f"{s['iqm'][i]:.2f} [{s['lower'][i]:.2f}, {s['upper'][i]:.2f}]"

    lines = [
        "IQM success over runs and tasks [95% stratified-bootstrap interval]",
        "",
        f"| env frames (all tasks) | {first} | {second} | intervals overlap |",
        "|---|---|---|---|",
        *[
            f"| {frames:,.0f} | {cell(first, i)} | {cell(second, i)} | {'yes' if summary['overlap'][i] else 'NO'} |"
            for i, frames in enumerate(summary["frames"])
        ],
        "",
        "| group | run | final success per task | largest critic loss | largest abs Q | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name in (first, second):
        for run, facts in summary["runs"][name].items():
            success = ", ".join(f"{task} {value:.2f}" for task, value in facts["final_success"].items())
            q = "-" if facts["max_abs_q"] is None else f"{facts['max_abs_q']:.3g}"
            lines.append(
                f"| {name} | {Path(run).name} | {success} | {facts['max_critic_loss']:.3g} | {q} | {facts['wall_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                        help="a group's name, then its run directories; given twice")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.group) != 2 or any(len(group) < 2 for group in args.group):
        parser.error("give --group NAME RUN_DIR [RUN_DIR ...] exactly twice")
    if args.group[0][0] == args.group[1][0]:
        parser.error(f"the two groups need different names, both are {args.group[0][0]!r}")
    groups = {name: [Path(run) for run in runs] for name, *runs in args.group}
    unfinished = [str(run) for runs in groups.values() for run in runs if run_status(run) != "done"]
    if unfinished:
        parser.error(f"these runs have not finished (no sweep.json saying done): {', '.join(unfinished)}")
    args.out.mkdir(parents=True, exist_ok=True)
    compare(groups, args.out)
    print((args.out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
