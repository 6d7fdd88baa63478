"""Learning benchmark on MT10: D2R vs Soft Modularization vs MT-SAC, same budget and seeds.

    python benchmarks/learning_mt10.py --preset cpu --seeds 0 1      # about 70 min on 2 CPU cores
    python benchmarks/learning_mt10.py --preset gpu --seeds 0 1 2    # the reference budget (GPU)

Each (method, seed) is a normal training run under ``--out``; a run stopped by Ctrl-C is
saved (replay buffer included in the cpu preset) and the same command resumes it with its
saved config; finished runs are skipped. ``seed``, ``log.root`` and ``log.name`` are set
per run and cannot be overridden. Afterwards the evaluation
logs are read back and ``learning_curves.png`` (mean success and return vs env frames,
shaded min-max over seeds), ``per_task.png`` and ``summary.md`` (final table) are written.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402
from d2r_torchrl.training.builders import task_names  # noqa: E402
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME  # noqa: E402
from d2r_torchrl.training.config import apply_overrides, preset  # noqa: E402
from d2r_torchrl.training.trainer import Trainer  # noqa: E402

METHODS = ("d2r", "soft_modular", "mt_sac")
METRICS = {"success": "mean success rate", "return": "mean episode return (Meta-World reward, to success)"}
PER_RUN_KEYS = ("seed", "log.root", "log.name")
PRESETS = {
    "cpu": [
        "env.max_episode_steps=200",
        "collector.steps_per_task=100",
        "collector.updates_per_round=50",
        "collector.warmup_rounds=5",
        "collector.total_steps_per_task=6000",
        "buffer.batch_size_per_task=64",
        "buffer.capacity=100000",
        "eval.interval_rounds=10",
        "eval.episodes_per_task=4",
        "log.checkpoint_interval_rounds=1000",
        "buffer.in_checkpoint=true",
    ],
    "gpu": [],  # the presets as they are: the reference budget (1.5M steps per task)
}


def run_all(out: Path, methods: list[str], seeds: list[int], overrides: list[str]) -> None:
    """Train every (method, seed) not finished yet; ``<run>/benchmark.json`` records whether
    the run finished, its wall seconds (summed over resumed segments, set-up included),
    updates and frames."""
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}_seed{seed}"
            record = run_dir / "benchmark.json"
            state = json.loads(record.read_text()) if record.exists() else {"done": False, "seconds": 0.0}
            if state["done"]:
                continue
            started = time.perf_counter()
            if (run_dir / CHECKPOINT_NAME).exists():
                trainer = Trainer.resume(run_dir)
            else:
                config = apply_overrides(
                    preset(method, "MT10"), [*overrides, f"seed={seed}", f"log.root={out}", f"log.name={run_dir.name}"]
                )
                trainer = Trainer(config)
            trainer.train()
            state.update(
                done=not trainer.interrupted,
                seconds=state["seconds"] + time.perf_counter() - started,
                updates=trainer.counters.updates,
                frames=trainer.counters.frames,
            )
            record.write_text(json.dumps(state, indent=2))
            if trainer.interrupted:
                raise SystemExit(f"Interrupted: {run_dir} is saved; the same command resumes it.")


def eval_curve(run_dir: Path, name: str) -> tuple[list[float], list[float]]:
    """``(frames, values)`` of one evaluation scalar, e.g. ``success_mean`` or ``return/reach-v3``."""
    return read_scalar_csv(run_dir / "scalars" / "eval" / f"{name}.csv")


def summarise(out: Path, methods: list[str], seeds: list[int]) -> dict:
    """Plot mean curves (shaded min-max over seeds) and collect final values per method."""
    tasks = task_names(preset("d2r", "MT10"))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4))
    summary: dict = {}
    for method in methods:
        runs = [out / f"{method}_seed{seed}" for seed in seeds]
        summary[method] = {}
        for ax, (metric, label) in zip(axes, METRICS.items()):
            curves = [eval_curve(run, f"{metric}_mean") for run in runs]
            length = min(len(values) for _, values in curves)
            steps = curves[0][0][:length]
            columns = list(zip(*[values[:length] for _, values in curves]))
            line, = ax.plot(steps, [statistics.fmean(c) for c in columns], label=method)
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.2)
            ax.set(xlabel="env frames (all tasks)", ylabel=label)
            finals = [values[-1] for _, values in curves]
            summary[method][metric] = {
                "final_mean": statistics.fmean(finals),
                "final_std": statistics.pstdev(finals),
                "per_seed": finals,
                "per_task": {t: statistics.fmean(eval_curve(run, f"{metric}/{t}")[1][-1] for run in runs) for t in tasks},
                "frames": steps[-1],
            }
    for method in methods:
        records = [json.loads((out / f"{method}_seed{seed}" / "benchmark.json").read_text()) for seed in seeds]
        summary[method]["wall_seconds"] = [r["seconds"] for r in records]
        summary[method]["updates"] = [r["updates"] for r in records]
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle(f"Meta-World MT10, seeds {seeds}")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)
    _plot_per_task(out, summary, tasks)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_table(summary, tasks, seeds))
    return summary


def _plot_per_task(out: Path, summary: dict, tasks: tuple[str, ...]) -> None:
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(9, 6), sharex=True)
    width = 0.8 / len(summary)
    for ax, (metric, label) in zip(axes, METRICS.items()):
        for i, (method, result) in enumerate(summary.items()):
            per_task = result[metric]["per_task"]
            ax.bar([t + i * width for t in range(len(tasks))], [per_task[t] for t in tasks], width, label=method)
        ax.set(ylabel=f"final {label.removeprefix('mean ')}")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    axes[-1].set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=60, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "per_task.png", dpi=120)
    plt.close(fig)


def _table(summary: dict, tasks: tuple[str, ...], seeds: list[int]) -> str:
    def cell(result: dict) -> str:
        return f"{result['final_mean']:.3f} ± {result['final_std']:.3f} ({', '.join(f'{v:.2f}' for v in result['per_seed'])})"

    def per_seed(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    lines = [
        f"| method | final success, mean ± std over seeds {seeds} (per seed) | final return (per seed) "
        "| updates | wall s per run |",
        "|---|---|---|---|---|",
        *[
            f"| {m} | {cell(r['success'])} | {cell(r['return'])} | {per_seed(r['updates'])} | {per_seed(r['wall_seconds'])} |"
            for m, r in summary.items()
        ],
        "",
        "| task | " + " | ".join(f"{m} success / return" for m in summary) + " |",
        "|---|" + "---|" * len(summary),
        *[
            f"| {t} | "
            + " | ".join(f"{r['success']['per_task'][t]:.2f} / {r['return']['per_task'][t]:.1f}" for r in summary.values())
            + " |"
            for t in tasks
        ],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/learning"))
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="extra config overrides for every run, e.g. --set device=cuda log.progress_bar=false",
    )
    args = parser.parse_args()
    reserved = [o for o in args.overrides if o.split("=", 1)[0] in PER_RUN_KEYS]
    if reserved:
        parser.error(f"--set {' '.join(reserved)}: {', '.join(PER_RUN_KEYS)} are set per run (use --seeds / --out).")
    args.out.mkdir(parents=True, exist_ok=True)
    run_all(args.out, args.methods, args.seeds, [*PRESETS[args.preset], *args.overrides])
    summarise(args.out, args.methods, args.seeds)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
