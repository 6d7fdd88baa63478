"""Milliseconds per replay step (sample a batch, then write its priorities back) of each
buffer kind at MT10 (10 tasks, batch 1,280, 100k transitions stored) and MT50 (50 tasks,
batch 6,400, 500k stored), next to the stratified sampler; all kinds take turns.

    python benchmarks/bench_replay.py [--sizes MT10 MT50] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from d2r_torchrl.data.replay import example_transitions, make_replay_buffer

SIZES = {"MT10": (10, 1_280, 100_000), "MT50": (50, 6_400, 500_000)}
KINDS = ("stratified", "stratified_prioritized", "prioritized", "uniform")


def filled_buffer(kind: str, num_tasks: int, batch_size: int, stored: int):
    """A buffer of ``kind`` holding ``stored`` transitions of the env's keys (D2R routes
    included), in the task-interleaved layout."""
    buffer = make_replay_buffer(kind, capacity=stored, batch_size=batch_size, num_tasks=num_tasks)
    rows = example_transitions(num_tasks, 39, 4, num_route_logits=136).expand(stored // num_tasks, num_tasks)
    buffer.extend(rows.reshape(-1).clone())
    return buffer


def replay_step(buffer, prioritized: bool) -> None:
    batch = buffer.sample()
    if prioritized:
        batch.set("td_error", torch.rand(batch.shape[0]))
        buffer.update_tensordict_priority(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{'size':6} {'kind':24} {'ms/step':>8} {'x stratified':>13}")
    for size in args.sizes:
        buffers = {kind: filled_buffer(kind, *SIZES[size]) for kind in KINDS}
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):
            for kind, buffer in buffers.items():
                start = time.perf_counter()
                replay_step(buffer, "prioritized" in kind)
                times[kind].append(time.perf_counter() - start)
        base = statistics.median(times["stratified"])
        for kind, values in times.items():
            ms = statistics.median(values) * 1e3
            print(f"{size:6} {kind:24} {ms:8.2f} {ms / (base * 1e3):13.2f}")


if __name__ == "__main__":
    main()
