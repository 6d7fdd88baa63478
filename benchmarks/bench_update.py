"""Milliseconds per full multi-task SAC update, D2R vs Soft Modularization vs MT-SAC.

One update = loss (twin critics under vmap), backward, per-network clipping and Adam
steps, target soft update and route-temperature refresh (``sac_update``). Sizes: MT10
(T=10, batch 1,280) and MT50 (T=50, batch 6,400), all measured in one run; the headline
is the ratio to MT-SAC.

    python benchmarks/bench_update.py [--sizes MT10 MT50] [--repeats 5] [--device auto] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.modules import make_actor, make_critic
from d2r_torchrl.training import builders
from d2r_torchrl.training.config import preset
from d2r_torchrl.training.update import sac_update

SIZES = {"MT10": (10, 1280), "MT50": (50, 6400)}
ARCHITECTURES = ("d2r", "soft_modular", "mt_sac")
OBS, ACT = 39, 4
REFERENCE_MS = {"MT10": 650.0, "MT50": 7700.0}


def synthetic_batch(actor, num_tasks: int, batch_size: int, device: torch.device) -> TensorDict:
    task_id = torch.arange(batch_size, device=device) % num_tasks
    batch = TensorDict(observation=torch.randn(batch_size, OBS, device=device), task_id=task_id, batch_size=[batch_size])
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        actor(batch)
    batch["next"] = TensorDict(
        observation=torch.randn(batch_size, OBS, device=device),
        task_id=task_id,
        reward=torch.randn(batch_size, 1, device=device),
        done=torch.zeros(batch_size, 1, dtype=torch.bool, device=device),
        terminated=torch.zeros(batch_size, 1, dtype=torch.bool, device=device),
        batch_size=[batch_size],
    )
    return batch


def time_update(architecture: str, num_tasks: int, batch_size: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds of one update after two warm-up updates."""
    config = preset(architecture, "MT50" if num_tasks > 10 else "MT10")
    spec = Bounded(-1.0, 1.0, (ACT,), device=device)
    kwargs = builders.network_kwargs(config)
    actor = make_actor(architecture, OBS, spec, num_tasks, **kwargs).to(device)
    critic = make_critic(architecture, OBS, ACT, num_tasks, **kwargs).to(device)
    loss, updater = builders.make_loss(config, actor, critic, num_tasks)
    optimizers = builders.make_optimizers(config, loss)
    batch = synthetic_batch(actor, num_tasks, batch_size, device)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sac_update(loss, optimizers, updater, batch.clone())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = builders.resolve_device(args.device)
    results = {}
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(f"{'size':6} {'architecture':14} {'ms/update':>10} {'x MT-SAC':>9} {'reference / ours':>17}")
    for size in args.sizes:
        num_tasks, batch_size = SIZES[size]
        times = {arch: time_update(arch, num_tasks, batch_size, args.repeats, device) for arch in args.architectures}
        for arch, ms in times.items():
            ratio = ms / times["mt_sac"] if "mt_sac" in times else float("nan")
            speedup = REFERENCE_MS[size] / ms if arch == "d2r" else float("nan")
            print(f"{size:6} {arch:14} {ms:10.1f} {ratio:9.2f} {speedup:17.1f}")
        results[size] = times
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "ms_per_update": results}, handle, indent=2)


if __name__ == "__main__":
    main()
