"""Time and disk cost of an MT10-size checkpoint, with and without the replay buffer.

D2R on MT10 with the reference networks, optimisers and a prioritized buffer of the
reference capacity (1,000,000 transitions) filled to ``--fill`` with real MT10 transitions
(one collected round repeated). Three ways to keep the buffer across a resume:

- ``none``: ``buffer.in_checkpoint=false`` (the resumed run refills it);
- ``in-memory``: the in-memory buffer saved whole in every checkpoint;
- ``memory-mapped``: the buffer's files stay in ``run_dir/buffer``; a checkpoint flushes
  them and records the length, cursor and priority trees.

For each: seconds of the first ``MultiTaskTrainer.save`` after filling (atomic write, flushed to disk:
for the memory-mapped buffer this flushes every transition written so far), the median of
``--repeats`` further saves (nothing new to flush), the median seconds of loading the
checkpoint, its size, and the disk blocks the buffer files take. A save also needs room for
its staged copy while it runs (about the checkpoint's size again).

    python benchmarks/bench_checkpoint.py [--fill 1.0] [--repeats 3] [--root /tmp/bench_checkpoint]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.data.replay import prepare_transitions
from d2r_torchrl.training import builders, checkpointing, preflight
from d2r_torchrl.training.config import apply_overrides, preset
from d2r_torchrl.training.trainer import MultiTaskTrainer

VARIANTS = {
    "none": ["buffer.in_checkpoint=false"],
    "in-memory": ["buffer.in_checkpoint=true"],
    "memory-mapped": ["buffer.memmap_above=100000"],
}
MIB = 2**20


def fill(trainer: MultiTaskTrainer, fraction: float) -> int:
    """Extend the buffer with one collected round (200 steps per task) repeated until
    ``fraction`` of its capacity holds transitions; returns the number stored."""
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        env = builders.env_factory(trainer.config, trainer.tasks)()
        rollout = env.rollout(200, trainer.actor, break_when_any_done=False)
    batch = prepare_transitions(rollout, trainer.num_route_logits)
    target = int(fraction * trainer.buffer.storage.max_size)
    while len(trainer.buffer) + batch.numel() <= target:
        trainer.buffer.extend(batch)
    return len(trainer.buffer)


def measure(root: Path, variant: str, fraction: float, repeats: int) -> dict[str, float]:
    config = apply_overrides(
        preset("d2r", "MT10"), [*VARIANTS[variant], "device=cpu", f"log.root={root}", f"log.name={variant}", "log.progress_bar=false"]
    )
    trainer = MultiTaskTrainer(config)
    stored = fill(trainer, fraction)
    save_s = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        path = trainer.save()
        save_s.append(time.perf_counter() - started)
    load_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        checkpointing.load(trainer.checkpoint, trainer.run_dir, map_location="cpu")
        load_s.append(time.perf_counter() - started)
    return {
        "transitions": stored,
        "first_save_s": save_s[0],
        "save_s": statistics.median(save_s[1:]),
        "load_s": statistics.median(load_s),
        "checkpoint_mib": path.stat().st_size / MIB,
        "buffer_files_mib": preflight.allocated_bytes(trainer.run_dir / "buffer") / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fill", type=float, default=1.0, help="fraction of the 1M capacity to fill")
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads timed after the first save")
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_checkpoint"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    print(
        f"{'buffer':<14} {'transitions':>11} {'first save s':>12} {'save s':>7} {'load s':>7} "
        f"{'checkpoint MiB':>15} {'buffer files MiB':>17}"
    )
    try:
        for variant in args.variants:
            r = measure(args.root, variant, args.fill, args.repeats)
            print(
                f"{variant:<14} {r['transitions']:>11,} {r['first_save_s']:>12.2f} {r['save_s']:>7.2f} {r['load_s']:>7.2f} "
                f"{r['checkpoint_mib']:>15.1f} {r['buffer_files_mib']:>17.1f}",
                flush=True,
            )
    finally:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
