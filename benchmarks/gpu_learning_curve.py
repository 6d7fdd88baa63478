"""Learning curve of one training run from its CSV logs (the GPU suite's ``report`` step).

    python benchmarks/gpu_learning_curve.py .gpu/d2r_mt10 --out benchmarks/out/gpu

Writes ``learning_curve.png`` (mean evaluation success and return against env frames,
all tasks together) and ``learning.json`` (the evaluation points, the frames and updates
reached, and the wall seconds of the resumed segments listed in ``RUN_DIR/segments.csv``,
one ``started_utc,seconds,exit_code`` row per call). A step logged twice (a segment killed
after logging, before its checkpoint) keeps its last value.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402

CURVES = {"success_mean": "mean success rate", "return_mean": "mean episode return (scaled reward)"}


def scalar_curve(path: Path) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of a CSV scalar sorted by step, one value per step (the last
    logged); empty when the file does not exist."""
    if not path.exists():
        return [], []
    latest = dict(zip(*read_scalar_csv(path)))
    steps = sorted(latest)
    return steps, [latest[step] for step in steps]


def segments(run_dir: Path) -> list[dict]:
    """Rows of ``segments.csv``: ``started_utc``, ``seconds``, ``exit_code``."""
    path = run_dir / "segments.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        rows = [row for row in csv.reader(handle) if len(row) == 3]
    return [{"started_utc": start, "seconds": float(seconds), "exit_code": int(code)} for start, seconds, code in rows]


def summarise(run_dir: Path) -> dict:
    """Evaluation curves, progress and wall time of ``run_dir``."""
    evals = {name: scalar_curve(run_dir / "scalars" / "eval" / f"{name}.csv") for name in CURVES}
    frames, _ = scalar_curve(run_dir / "scalars" / "train" / "loss_actor.csv")
    calls = segments(run_dir)
    return {
        "run_dir": str(run_dir),
        "frames_at_last_update_log": frames[-1] if frames else 0,
        "evaluations": {name: {"frames": steps, "values": values} for name, (steps, values) in evals.items()},
        "segments": calls,
        "wall_seconds": sum(call["seconds"] for call in calls),
    }


def plot(summary: dict, path: Path) -> Path:
    """Two panels, success and return against frames."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 4))
    for ax, (name, label) in zip(axes, CURVES.items()):
        curve = summary["evaluations"][name]
        ax.plot(curve["frames"], curve["values"], marker="o")
        ax.set(xlabel="env frames (all tasks)", ylabel=label)
    axes[0].set_ylim(0, 1)
    fig.suptitle(f"{Path(summary['run_dir']).name}: {summary['wall_seconds'] / 60:.0f} min in {len(summary['segments'])} segments")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.run_dir / "config.json").exists():
        parser.error(f"{args.run_dir} has no config.json: it is not a run directory.")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarise(args.run_dir)
    plot(summary, args.out / "learning_curve.png")
    (args.out / "learning.json").write_text(json.dumps(summary, indent=2))
    success = summary["evaluations"]["success_mean"]
    last = f"{success['values'][-1]:.3f} at {success['frames'][-1]:.0f} frames" if success["frames"] else "no evaluation yet"
    print(f"{args.run_dir}: {summary['frames_at_last_update_log']:.0f} frames, {summary['wall_seconds']:.0f} s, success {last}")


if __name__ == "__main__":
    main()
