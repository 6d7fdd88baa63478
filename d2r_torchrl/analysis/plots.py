"""PNG figures of routing statistics and training curves (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from d2r_torchrl.analysis.statistics import RoutingStatistics  # noqa: E402


def read_scalar_csv(path: Path) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of a TorchRL ``CSVLogger`` scalar file (``step,value`` rows), in
    step order. A step written twice (a run resumed from a checkpoint older than its last
    log rows logs those steps again) keeps its last value."""
    by_step: dict[float, float] = {}
    with path.open() as handle:
        for row in csv.reader(handle):
            if len(row) == 2:
                by_step[float(row[0])] = float(row[1])
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def plot_route_graphs(stats: RoutingStatistics, task_names: Sequence[str], path: Path) -> Path:
    """One heat-map per task: row = gate (module 2..N, then the output head), column =
    source module, colour = how often the top-k route uses that edge."""
    num_tasks, num_modules, _ = stats.edge_frequency.shape
    cols = min(5, num_tasks)
    rows = -(-num_tasks // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    labels = [str(i + 2) for i in range(num_modules - 1)] + ["out"]
    for task, ax in enumerate(axes.flat):
        if task >= num_tasks:
            ax.axis("off")
            continue
        ax.imshow(stats.edge_frequency[task].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{task_names[task]}\ndepth {stats.mean_depth[task]:.1f}", fontsize=8)
        ax.set_xticks(range(num_modules), [str(i + 1) for i in range(num_modules)], fontsize=5)
        ax.set_yticks(range(num_modules), labels, fontsize=5)
        ax.set_xlabel("source module", fontsize=6)
        ax.set_ylabel("gate of", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_depth(stats: RoutingStatistics, task_names: Sequence[str], path: Path) -> Path:
    """Bar chart of the mean effective depth (modules on the longest chain) per task."""
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(task_names)), 3.5))
    ax.bar(range(len(task_names)), stats.mean_depth.numpy())
    ax.set_xticks(range(len(task_names)), task_names, rotation=75, fontsize=7)
    ax.set_ylabel("effective depth (modules)")
    ax.set_ylim(0, stats.edge_frequency.shape[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_temperatures(alpha_dir: Path, task_names: Sequence[str], path: Path) -> Path | None:
    """Per-task SAC alpha and routing temperature ``T softmax(-log alpha)`` over training,
    from the run's ``scalars/train/alpha/<task>.csv``; None when nothing was logged."""
    curves = [read_scalar_csv(alpha_dir / f"{name}.csv") for name in task_names if (alpha_dir / f"{name}.csv").exists()]
    if len(curves) != len(task_names) or not curves[0][0]:
        return None
    length = min(len(values) for _, values in curves)
    steps = curves[0][0][:length]
    alpha = torch.tensor([values[:length] for _, values in curves])
    temperature = len(task_names) * torch.softmax(-alpha.log(), dim=0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for task, name in enumerate(task_names):
        left.plot(steps, alpha[task], label=name)
        right.plot(steps, temperature[task], label=name)
    left.set(xlabel="env frames", ylabel="alpha", yscale="log", title="SAC temperature per task")
    right.set(xlabel="env frames", ylabel="routing temperature", title="route balancing temperature")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
