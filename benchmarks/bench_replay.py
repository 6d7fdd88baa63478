"""Milliseconds per replay step (sample a batch, then write its priorities back) and per
write (store one collected ``[T, batch // T]`` batch through ``prepare_transitions``) of each
buffer kind at MT10 (10 tasks, batch 1,280) and MT50 (50 tasks, batch 6,400), in full buffers
of 1,000,000 transitions; all kinds take turns.

    python benchmarks/bench_replay.py [--sizes MT10 MT50] [--repeats 20] [--capacity 1000000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from d2r_torchrl.data.replay import example_transitions, make_replay_buffer, prepare_transitions

SIZES = {"MT10": (10, 1_280), "MT50": (50, 6_400)}
KINDS = ("stratified", "stratified_prioritized", "prioritized", "uniform")
OBS, ACTION, ROUTE_LOGITS = 39, 4, 136


def collected_batch(num_tasks: int, steps: int):
    """``[T, steps]`` transitions of the env's keys (D2R routes included), as a collector yields."""
    return example_transitions(num_tasks, OBS, ACTION, ROUTE_LOGITS).unsqueeze(1).expand(num_tasks, steps).clone()


def write(buffer, batch) -> None:
    buffer.extend(prepare_transitions(batch, ROUTE_LOGITS))


def replay_step(buffer, prioritized: bool) -> None:
    batch = buffer.sample()
    if prioritized:
        batch.set("td_error", torch.rand(batch.shape[0]))
        buffer.update_tensordict_priority(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--capacity", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"{'size':6} {'kind':24} {'step ms':>8} {'write ms':>9}")
    for size in args.sizes:
        num_tasks, batch_size = SIZES[size]
        batch = collected_batch(num_tasks, batch_size // num_tasks)
        buffers = {}
        for kind in KINDS:
            buffers[kind] = make_replay_buffer(kind, capacity=args.capacity, batch_size=batch_size, num_tasks=num_tasks)
            write(buffers[kind], collected_batch(num_tasks, args.capacity // num_tasks))  # full
        steps: dict[str, list[float]] = {kind: [] for kind in KINDS}
        writes: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):
            for kind, buffer in buffers.items():
                start = time.perf_counter()
                write(buffer, batch)
                writes[kind].append(time.perf_counter() - start)
                start = time.perf_counter()
                replay_step(buffer, "prioritized" in kind)
                steps[kind].append(time.perf_counter() - start)
        for kind in KINDS:
            step_ms, write_ms = (statistics.median(times[kind]) * 1e3 for times in (steps, writes))
            print(f"{size:6} {kind:24} {step_ms:8.2f} {write_ms:9.2f}")
        del buffers


if __name__ == "__main__":
    main()
