"""Frames/s of Meta-World stepping: raw gymnasium against the project's TorchRL paths.

All paths step the same tasks with uniform random actions and auto-reset at the time
limit; one frame = one step of one task. Construction, a warm-up and the first reset are
not timed. With ``--repeats N`` the paths run N times in turn and each keeps its best
rate (the least disturbed by other work on the machine).

    (a) raw         gymnasium envs stepped in a loop, one process
    (b) serial      make_env(execution="serial").rollout
    (c) parallel    make_env(execution="parallel").rollout (one process per task)
    (d) collector   torchrl.collectors.Collector over a serial env
    (e) multisync   torchrl.collectors.MultiSyncCollector, 2 workers, each a serial env
                    over half the tasks

Target: the best TorchRL path reaches >= 0.9x the raw single-process rate.

    python benchmarks/bench_env.py [--frames 10000] [--tasks MT10] [--repeats 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Iterable

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs.utils import RandomPolicy

from d2r_torchrl.envs import make_env, resolve_tasks

MAX_EPISODE_STEPS = 500
WARMUP_STEPS = 20  # per task


def raw_fps(tasks: tuple[str, ...], frames: int) -> float:
    """(a) Raw Meta-World envs stepped one after the other, reset on truncation."""
    envs = [
        gym.make(
            "Meta-World/MT1",
            env_name=name,
            seed=i,
            max_episode_steps=MAX_EPISODE_STEPS,
            disable_env_checker=True,
        )
        for i, name in enumerate(tasks)
    ]
    rng = np.random.default_rng(0)

    def run(steps: int) -> None:
        for _ in range(steps):
            for env in envs:
                _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
                if terminated or truncated:
                    env.reset()

    for env in envs:
        env.reset()
    run(WARMUP_STEPS)
    steps = frames // len(tasks)
    start = time.perf_counter()
    run(steps)
    return steps * len(tasks) / (time.perf_counter() - start)


def env_fps(tasks: tuple[str, ...], frames: int, execution: str) -> float:
    """(b), (c) ``make_env(...).rollout`` with a random policy."""
    env = make_env(tasks, max_episode_steps=MAX_EPISODE_STEPS, execution=execution)
    policy = RandomPolicy(env.action_spec)
    env.rollout(WARMUP_STEPS, policy, break_when_any_done=False)
    steps = frames // len(tasks)
    state = env.reset()
    start = time.perf_counter()
    env.rollout(steps, policy, break_when_any_done=False, auto_reset=False, tensordict=state)
    fps = steps * len(tasks) / (time.perf_counter() - start)
    env.close()
    return fps


def timed_batches(batches: Iterable[TensorDictBase]) -> float:
    """Frames/s over all batches but the first (which pays for start-up)."""
    frames, start = 0, 0.0
    for i, batch in enumerate(batches):
        if i == 0:
            start = time.perf_counter()
        else:
            frames += batch.numel()
    return frames / (time.perf_counter() - start)


def collector_fps(tasks: tuple[str, ...], frames: int) -> float:
    """(d) A single-process ``Collector`` over a serial env."""
    env = make_env(tasks, max_episode_steps=MAX_EPISODE_STEPS)
    batch = 50 * len(tasks)
    collector = Collector(
        env, RandomPolicy(env.action_spec), frames_per_batch=batch, total_frames=frames + batch
    )
    fps = timed_batches(collector)
    collector.shutdown()
    return fps


def multisync_fps(tasks: tuple[str, ...], frames: int, workers: int = 2) -> float:
    """(e) ``MultiSyncCollector``: each worker runs a serial env over a slice of the tasks
    (ids kept with ``first_task_id``); ``policy=None`` gives each worker a
    ``RandomPolicy`` of its own env's action spec."""
    bounds = np.linspace(0, len(tasks), workers + 1).astype(int)
    factories: list[Callable] = [
        functools.partial(
            make_env, tasks[lo:hi], max_episode_steps=MAX_EPISODE_STEPS, first_task_id=int(lo)
        )
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    batch = 50 * len(tasks)
    collector = MultiSyncCollector(factories, None, frames_per_batch=batch, total_frames=frames + batch)
    fps = timed_batches(collector)
    collector.shutdown()
    return fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000, help="timed frames per path")
    parser.add_argument("--tasks", default="MT10", help="'MT10', 'MT50', or comma-separated task names")
    parser.add_argument("--repeats", type=int, default=1, help="runs per path, the best is kept")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    tasks = resolve_tasks(args.tasks)
    torch.manual_seed(0)
    print(
        f"{len(tasks)} tasks, {args.frames} frames per path, best of {args.repeats}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    paths: dict[str, Callable[[], float]] = {
        "raw": lambda: raw_fps(tasks, args.frames),
        "serial": lambda: env_fps(tasks, args.frames, "serial"),
        "parallel": lambda: env_fps(tasks, args.frames, "parallel"),
        "collector": lambda: collector_fps(tasks, args.frames),
        "multisync": lambda: multisync_fps(tasks, args.frames),
    }
    fps = dict.fromkeys(paths, 0.0)
    for _ in range(args.repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            rate = run()
            fps[name] = max(fps[name], rate)
            elapsed = time.perf_counter() - start
            print(f"  {name}: {rate:.0f} frames/s ({elapsed:.0f} s with set-up)", flush=True)
    print(f"\n{'path':<10} {'frames/s':>9} {'x raw':>6}")
    for name, value in fps.items():
        print(f"{name:<10} {value:>9.0f} {value / fps['raw']:>6.2f}")
    best = max((name for name in fps if name != "raw"), key=fps.__getitem__)
    ratio = fps[best] / fps["raw"]
    verdict = "met" if ratio >= 0.9 else "NOT met"
    print(f"best TorchRL path: {best}, {ratio:.2f}x raw (target >= 0.9x: {verdict})")
    faster = "serial" if fps["serial"] >= fps["parallel"] else "parallel"
    print(f"make_env: {faster} is faster (parallel/serial = {fps['parallel'] / fps['serial']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            results = {"tasks": list(tasks), "frames": args.frames, "repeats": args.repeats, "fps": fps}
            json.dump({**results, "best": best, "best_ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
