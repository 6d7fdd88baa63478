"""Across-seed aggregates of evaluation logs: IQM with stratified bootstrap intervals (rliable).

Scores are arrays ``[runs, tasks, points]`` (or ``[runs, points]``, one task): the
interquartile mean pools every (run, task) score at an evaluation point, and the
bootstrap resamples runs within each task (rliable's stratified bootstrap).
:func:`write_report` reads runs' CSV logs (``scalars/eval/<metric>/<task>.csv``) and
writes ``curves.png``, ``summary.md`` and ``summary.json``.

Needs the ``rliable`` package (``pip install -e ".[ray]"`` or ``".[analysis]"``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402

METRICS = {"success": "success rate", "return": "episode return (scaled reward)"}


@dataclass
class IntervalEstimate:
    """IQM per evaluation point and its confidence interval, each ``[points]``."""

    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """rliable's bootstrap draws from NumPy's global generator: seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def iqm_intervals(
    scores: Mapping[str, np.ndarray], reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, IntervalEstimate]:
    """IQM and ``confidence`` stratified-bootstrap interval per name and evaluation point.

    ``scores[name]`` is ``[runs, tasks, points]`` or ``[runs, points]``; ``reps`` bootstrap
    resamples, drawn reproducibly from ``seed``.
    """
    if importlib.util.find_spec("rliable") is None:
        raise ImportError('Aggregation needs the rliable package: pip install -e ".[analysis]"')
    from rliable import library, metrics

    arrays = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 2:
            values = values[:, None, :]
        if values.ndim != 3 or 0 in values.shape:
            raise ValueError(f"scores[{name!r}] has shape {values.shape}; expected non-empty [runs, points] or [runs, tasks, points].")
        arrays[name] = values

    def iqm_per_point(values: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(values[..., p]) for p in range(values.shape[-1])])

    with _numpy_seed(seed):
        points, intervals = library.get_interval_estimates(
            arrays, iqm_per_point, reps=reps, confidence_interval_size=confidence
        )
    return {name: IntervalEstimate(points[name], intervals[name][0], intervals[name][1]) for name in arrays}


def run_tasks(run_dir: Path) -> tuple[str, ...]:
    """The task names of a run directory, from its ``config.json``."""
    from d2r_torchrl.training.builders import task_names
    from d2r_torchrl.training.config import RunConfig

    return task_names(RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())))


def largest_logged_q(run_dir: Path) -> float | None:
    """The largest ``train/q_max`` (``|Q(s, a)|``) a run logged over its tasks and rounds;
    None when it logged none (runs older than that log)."""
    values = [value for path in (run_dir / "scalars" / "train" / "q_max").glob("*.csv") for value in read_scalar_csv(path)[1]]
    finite = [value for value in values if np.isfinite(value)]
    return max(finite) if finite else None


def load_scores(run_dirs: Sequence[Path], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(frames [P], scores [runs, tasks, P])`` of ``eval/<metric>/<task>`` at the
    evaluation points every run and task logged. Raises ``ValueError`` when there are none."""
    tasks = run_tasks(run_dirs[0])
    paths = [[run / "scalars" / "eval" / metric / f"{task}.csv" for task in tasks] for run in run_dirs]
    missing = [str(path) for per_task in paths for path in per_task if not path.exists()]
    if missing:
        raise ValueError(f"No evaluation log {missing[0]} (and {len(missing) - 1} more): was eval.episodes_per_task 0?")
    curves = [[dict(zip(*read_scalar_csv(path))) for path in per_task] for per_task in paths]
    common = set.intersection(*(set(curve) for per_task in curves for curve in per_task))
    if not common:
        raise ValueError(f"No evaluation point of {metric!r} is common to {[str(r) for r in run_dirs]}.")
    frames = np.array(sorted(common))
    return frames, np.array([[[curve[f] for f in frames] for curve in per_task] for per_task in curves])


def write_report(
    groups: Mapping[str, Sequence[Path]], out_dir: Path, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Aggregate each group's runs (e.g. the seeds of one method) and write ``curves.png``
    (IQM vs env frames, shaded interval), ``summary.md`` (final IQM [interval] per group,
    final mean per task) and ``summary.json`` under ``out_dir``; returns the summary."""
    summary: dict = {}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4))
    for metric, ax in zip(METRICS, axes):
        loaded = {name: load_scores(list(runs), metric) for name, runs in groups.items()}
        estimates = iqm_intervals({name: scores for name, (_, scores) in loaded.items()}, reps, confidence, seed)
        for name, (frames, scores) in loaded.items():
            estimate = estimates[name]
            line, = ax.plot(frames, estimate.point, label=name)
            ax.fill_between(frames, estimate.lower, estimate.upper, color=line.get_color(), alpha=0.2)
            summary.setdefault(name, {"runs": [str(r) for r in groups[name]], "tasks": list(run_tasks(groups[name][0]))})
            summary[name][metric] = {
                "frames": frames.tolist(),
                "iqm": estimate.point.tolist(),
                "lower": estimate.lower.tolist(),
                "upper": estimate.upper.tolist(),
                "final_per_task_mean": scores[:, :, -1].mean(axis=0).tolist(),
            }
        ax.set(xlabel="env frames (all tasks)", ylabel=f"IQM {METRICS[metric]}")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle(f"IQM over runs and tasks, {confidence:.0%} stratified bootstrap interval")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "curves.png", dpi=120)
    plt.close(fig)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(_markdown(summary, confidence))
    return summary


def _markdown(summary: dict, confidence: float) -> str:
    def final(result: dict) -> str:
        return f"{result['iqm'][-1]:.3f} [{result['lower'][-1]:.3f}, {result['upper'][-1]:.3f}]"

    lines = [
        f"| group | runs | env frames | final success IQM [{confidence:.0%} CI] | final return IQM [{confidence:.0%} CI] |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {len(r['runs'])} | {r['success']['frames'][-1]:,.0f} | {final(r['success'])} | {final(r['return'])} |"
            for name, r in summary.items()
        ],
        "",
        "| task | " + " | ".join(f"{name} success / return (mean over runs)" for name in summary) + " |",
        "|---|" + "---|" * len(summary),
    ]
    tasks = list(dict.fromkeys(task for r in summary.values() for task in r["tasks"]))
    for task in tasks:
        cells = []
        for r in summary.values():
            if task in r["tasks"]:
                i = r["tasks"].index(task)
                cells.append(f"{r['success']['final_per_task_mean'][i]:.2f} / {r['return']['final_per_task_mean'][i]:.1f}")
            else:
                cells.append("")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
