"""``python -m d2r_torchrl.analysis RUN_DIR [--episodes E] [--out DIR]``.

Loads the run's checkpoint, rolls out the deterministic policy in every task, and writes
``routes.png`` (top-k routing graph per task), ``depth.png`` (effective depth per task),
``temperatures.png`` (per-task alpha and routing temperature over training) and
``routing.json`` (depth and router-logit spread per task, see :class:`LogitSpread`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchrl.checkpoint import Checkpoint
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.analysis.plots import plot_depth, plot_route_graphs, plot_temperatures
from d2r_torchrl.analysis.statistics import RoutingStatistics, routing_statistics
from d2r_torchrl.modules.actor_critic import d2r_networks
from d2r_torchrl.training import builders, checkpointing
from d2r_torchrl.training.config import RunConfig


def analyse(run_dir: Path, out_dir: Path, episodes: int = 1) -> list[Path]:
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
    """``routing.json``: per-task depth, states and within-task logit spread; global spreads
    (``stats`` from :func:`routing_statistics`, which always measures the spread)."""
    summary = {
        "tasks": {
            task: {"mean_depth": depth, "states": int(states), "logit_spread_within_task": within}
            for task, depth, states, within in zip(
                tasks, stats.mean_depth.tolist(), stats.samples.tolist(), stats.spread.within_task.tolist()
            )
        },
        "logit_spread_across_tasks": stats.spread.across_tasks,
        "logit_spread_across_logits": stats.spread.across_logits,
    }
    path.write_text(json.dumps(summary, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=1, help="deterministic episodes per task to sample states")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/analysis)")
    args = parser.parse_args(argv)
    try:
        paths = analyse(args.run_dir, args.out or args.run_dir / "analysis", args.episodes)
    except (checkpointing.ResumeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
