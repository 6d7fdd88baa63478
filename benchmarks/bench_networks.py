"""Forward+backward time of the D2R networks against an MT-SAC MLP, in one run.

The D2R networks run as they do inside a loss: training mode, sampled routes,
ResRouting on. The baseline is :class:`MultiTaskMLP` (400-400-400 on state ⊕ one-hot).
Batches follow the reference recipe, 128 samples per task: 1,280 for MT10 (T=10) and
6,400 for MT50 (T=50). Target: D2R within 2x of MT-SAC. Counting multiply-adds alone,
a D2R network does about twice the work of the MLP (676k vs 343k per sample for the
policy), so 2x is the floor of this ratio rather than a loose target.

D2R and MLP passes alternate so that load from other processes hits both alike; the
ratio uses the medians (the minima are printed too).

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
WARMUP = 2


def forward_backward_ms(network: nn.Module, features: torch.Tensor, task_id: torch.Tensor) -> float:
    """Milliseconds of one forward pass and backward pass of a mean-square loss."""
    network.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = network(features, task_id)
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()
    return 1e3 * (time.perf_counter() - start)


def compare(
    in_features: int, out_features: int, num_tasks: int, repeats: int
) -> dict[str, list[float]]:
    """Interleaved timings of a D2R network and an MT-SAC MLP of the same interface."""
    networks = {
        "d2r": D2RNetwork(in_features, num_tasks, out_features, res_routing=True).train(),
        "mlp": MultiTaskMLP(in_features, num_tasks, out_features).train(),
    }
    batch = SAMPLES_PER_TASK * num_tasks
    features = torch.randn(batch, in_features)
    task_id = torch.arange(batch) % num_tasks
    times: dict[str, list[float]] = {name: [] for name in networks}
    with set_routing_mode("sample"):
        for step in range(WARMUP + repeats):
            for name, network in networks.items():
                elapsed = forward_backward_ms(network, features, task_id)
                if step >= WARMUP:
                    times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(
        f"{'setting':<7} {'network':<7} {'batch':>6} {'D2R med/min ms':>16} "
        f"{'MT-SAC med/min ms':>18} {'ratio':>6}"
    )
    for setting, num_tasks in SETTINGS.items():
        for role, in_features, out_features in (
            ("actor", STATE_DIM, 2 * ACTION_DIM),
            ("critic", STATE_DIM + ACTION_DIM, 1),
        ):
            times = compare(in_features, out_features, num_tasks, args.repeats)
            d2r, mlp = (statistics.median(times[name]) for name in ("d2r", "mlp"))
            print(
                f"{setting:<7} {role:<7} {SAMPLES_PER_TASK * num_tasks:>6} "
                f"{d2r:>8.1f}/{min(times['d2r']):<7.1f} {mlp:>9.1f}/{min(times['mlp']):<8.1f} "
                f"{d2r / mlp:>6.2f}"
            )


if __name__ == "__main__":
    main()
