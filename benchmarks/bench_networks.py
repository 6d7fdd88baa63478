"""Forward+backward time of the D2R networks against an MT-SAC MLP, in one run.

The D2R networks run as they do inside a loss: training mode, sampled routes,
ResRouting on. The baseline is :class:`MultiTaskMLP` (400-400-400 on state ⊕ one-hot).
Batches follow the reference recipe: 128 samples per task, so 1,280 for MT10 (T=10)
and 6,400 for MT50 (T=50). Target: D2R within 2x of MT-SAC.

    python benchmarks/bench_networks.py [--repeats 10] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from d2r_torchrl.modules import D2RNetwork, MultiTaskMLP, set_routing_mode

STATE_DIM, ACTION_DIM = 39, 4
SETTINGS = {"MT10": 10, "MT50": 50}
SAMPLES_PER_TASK = 128


def _step(network: nn.Module, features: torch.Tensor, task_id: torch.Tensor) -> None:
    out = network(features, task_id)
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()


def time_forward_backward(
    network: nn.Module, in_features: int, num_tasks: int, batch: int, repeats: int
) -> float:
    """Median milliseconds of one forward+backward pass (after two warm-up passes)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, in_features, generator=generator)
    task_id = torch.arange(batch) % num_tasks
    network.train()
    times = []
    with set_routing_mode("sample"):
        for i in range(repeats + 2):
            network.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _step(network, features, task_id)
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'setting':<6} {'network':<7} {'batch':>6} {'D2R ms':>9} {'MT-SAC ms':>10} {'ratio':>6}")
    for setting, num_tasks in SETTINGS.items():
        batch = SAMPLES_PER_TASK * num_tasks
        for role, in_features, out_features in (
            ("actor", STATE_DIM, 2 * ACTION_DIM),
            ("critic", STATE_DIM + ACTION_DIM, 1),
        ):
            d2r = D2RNetwork(in_features, num_tasks, out_features, res_routing=True)
            mlp = MultiTaskMLP(in_features, num_tasks, out_features)
            d2r_ms = time_forward_backward(d2r, in_features, num_tasks, batch, args.repeats)
            mlp_ms = time_forward_backward(mlp, in_features, num_tasks, batch, args.repeats)
            print(
                f"{setting:<6} {role:<7} {batch:>6} {d2r_ms:>9.1f} {mlp_ms:>10.1f} "
                f"{d2r_ms / mlp_ms:>6.2f}"
            )


if __name__ == "__main__":
    main()
