"""``python -m d2r_torchrl.analysis RUN_DIR [RUN_DIR ...] [--episodes E] [--out DIR]``.

For each run: loads its checkpoint, rolls out the deterministic policy in every task, and
writes to ``RUN_DIR/analysis`` ``routes.png`` (top-k routing graph per task), ``depth.png``
(effective depth per task), ``temperatures.png`` (per-task alpha and routing temperature
over training) and ``routing.json`` (per task: depth mean and histogram, modules run,
router-logit spread, see :class:`LogitSpread`; the Kruskal-Wallis test of equal depth across tasks, see
:class:`DepthTest`). With several runs (seeds of one setting, same tasks), ``--out``
(default: their common parent) also gets ``depth_across_runs.md``: each task's mean depth
in every run, so that a depth difference between tasks can be checked across seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torchrl.checkpoint import Checkpoint
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.analysis.plots import plot_depth, plot_route_graphs, plot_temperatures
from d2r_torchrl.analysis.statistics import RoutingStatistics, depth_test, routing_statistics
from d2r_torchrl.modules.actor_critic import d2r_networks
from d2r_torchrl.training import builders, checkpointing
from d2r_torchrl.training.config import RunConfig


def analyse(run_dir: Path, out_dir: Path, episodes: int = 1) -> list[Path]:
    """Write one run's figures and ``routing.json`` to ``out_dir``; return their paths."""
    config = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    if config.network.architecture != "d2r":
        raise ValueError(f"{run_dir} trained {config.network.architecture!r}; routing analysis needs a D2R run.")
    tasks = builders.task_names(config)
    env = builders.env_factory(config, tasks)()
    actor, critic = builders.make_actor_critic(config, env, len(tasks))
    loss, _ = builders.make_loss(config, actor, critic, len(tasks))
    checkpointing.load(Checkpoint(format="archive", loss=loss), run_dir, map_location="cpu")
    actor.eval()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollouts = [env.rollout(config.env.max_episode_steps, actor, break_when_any_done=False) for _ in range(episodes)]
    states = torch.cat([r.reshape(-1) for r in rollouts])
    stats = routing_statistics(d2r_networks(actor)[0], states["observation"], states["task_id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot_route_graphs(stats, tasks, out_dir / "routes.png"),
        plot_depth(stats, tasks, out_dir / "depth.png"),
        _write_summary(stats, tasks, out_dir / "routing.json"),
    ]
    temperatures = plot_temperatures(run_dir / "scalars" / "train" / "alpha", tasks, out_dir / "temperatures.png")
    return written + ([temperatures] if temperatures else [])


def _write_summary(stats: RoutingStatistics, tasks: tuple[str, ...], path: Path) -> Path:
    """``routing.json``: per-task depth, modules run, states and within-task logit spread;
    global spreads (``stats`` from :func:`routing_statistics`, which always measures the spread)."""
    test = depth_test(stats.depth_histogram)
    summary = {
        "tasks": {
            task: {
                "mean_depth": depth,
                "mean_modules": modules,
                "depth_histogram": {str(d + 1): int(n) for d, n in enumerate(histogram) if n},
                "states": int(states),
                "logit_spread_within_task": within,
            }
            for task, depth, modules, histogram, states, within in zip(
                tasks,
                stats.mean_depth.tolist(),
                stats.mean_modules.tolist(),
                stats.depth_histogram.tolist(),
                stats.samples.tolist(),
                stats.spread.within_task.tolist(),
            )
        },
        "depth_test": {"kruskal_wallis_h": test.statistic, "p_value": test.p_value},
        "logit_spread_across_tasks": stats.spread.across_tasks,
        "logit_spread_across_logits": stats.spread.across_logits,
    }
    path.write_text(json.dumps(summary, indent=2))
    return path


def write_depth_across_runs(summaries: dict[str, dict], path: Path) -> Path:
    """``depth_across_runs.md``: rows are tasks, columns each run's mean depth (from its
    ``routing.json`` summary), then the mean over runs; last row each run's test p-value."""
    runs = list(summaries)
    tasks = list(summaries[runs[0]]["tasks"])
    if any(list(summary["tasks"]) != tasks for summary in summaries.values()):
        raise ValueError("Comparing depth across runs needs runs of the same tasks.")
    rows = []
    for task in tasks:
        depths = [summaries[run]["tasks"][task]["mean_depth"] for run in runs]
        rows.append(f"| {task} | " + " | ".join(f"{d:.2f}" for d in depths) + f" | {sum(depths) / len(depths):.2f} |")
    p_values = " | ".join(f"{summaries[run]['depth_test']['p_value']:.2g}" for run in runs)
    lines = [
        "Mean route depth (modules on the longest chain) of the deterministic policy, per task and run.",
        "",
        "| task | " + " | ".join(runs) + " | mean |",
        "|---|" + "---|" * (len(runs) + 1),
        *rows,
        f"| p (equal depth, Kruskal-Wallis over states) | {p_values} | |",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--episodes", type=int, default=1, help="deterministic episodes per task to sample states")
    parser.add_argument("--out", type=Path, default=None,
                        help="one run: its figures' folder (default RUN_DIR/analysis); several: the "
                        "folder of depth_across_runs.md (default their common parent)")
    args = parser.parse_args(argv)
    several = len(args.run_dirs) > 1
    paths, summaries = [], {}
    try:
        for run_dir in args.run_dirs:
            out_dir = run_dir / "analysis" if several or args.out is None else args.out
            paths += analyse(run_dir, out_dir, args.episodes)
            summaries[run_dir.name] = json.loads((out_dir / "routing.json").read_text())
        if several:
            common = Path(os.path.commonpath([p.resolve() for p in args.run_dirs]))
            paths.append(write_depth_across_runs(summaries, (args.out or common) / "depth_across_runs.md"))
    except (checkpointing.ResumeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
