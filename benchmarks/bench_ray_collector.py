"""Frames/s of the Ray collector (2 actors) against the 2-worker ``MultiSyncCollector``.

Both are built by ``builders.make_collector`` from the same config (``collector.kind=ray``
or ``multi_sync``, 2 workers each stepping half of the tasks with the D2R actor under
exploration) and each yields rounds of ``steps_per_task`` steps in every task; the policy
weights are pushed after every round, as in training. Construction and the first
``--warmup`` rounds are not timed. With ``--repeats N`` the two collectors are measured
N times in turn and each keeps its best rate (the least disturbed by other work).

    python benchmarks/bench_ray_collector.py [--tasks MT10] [--steps-per-task 100] [--rounds 10] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import time

import ray

from d2r_torchrl.training import builders
from d2r_torchrl.training.config import apply_overrides, preset

KINDS = ("multi_sync", "ray")


def collector_fps(kind: str, tasks: str, steps_per_task: int, rounds: int, warmup: int) -> float:
    """Frames per second of ``rounds`` timed rounds of the ``kind`` collector."""
    config = apply_overrides(
        preset("d2r", "MT10"),
        [f"env.benchmark={tasks}", f"collector.kind={kind}", "collector.num_workers=2", "device=cpu",
         f"collector.steps_per_task={steps_per_task}", "collector.warmup_rounds=0"],
    )
    names = builders.task_names(config)
    env = builders.env_factory(config, names)()
    actor, _ = builders.make_actor_critic(config, env, len(names))
    env.close()
    collector = builders.make_collector(config, names, actor, builders.resolve_device("cpu"))
    frames, started = 0, None
    try:
        for i, batch in enumerate(collector):
            collector.update_policy_weights_()
            if i == warmup - 1:
                started = time.perf_counter()
            elif i >= warmup:
                frames += batch.numel()
            if i == warmup + rounds - 1:
                break
        return frames / (time.perf_counter() - started)
    finally:
        collector.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="MT10")
    parser.add_argument("--steps-per-task", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timer starts after a warm-up round).")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    best = {kind: 0.0 for kind in KINDS}
    try:
        for _ in range(args.repeats):
            for kind in KINDS:
                best[kind] = max(best[kind], collector_fps(kind, args.tasks, args.steps_per_task, args.rounds, args.warmup))
    finally:
        ray.shutdown()
    result = {**{f"{kind}_fps": round(fps, 1) for kind, fps in best.items()}, "ray_over_multi_sync": round(best["ray"] / best["multi_sync"], 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
