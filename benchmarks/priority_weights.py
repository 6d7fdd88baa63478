"""The importance weights a run's per-task prioritized replay gives, task by task.

    python benchmarks/priority_weights.py RUN_DIR [--batches 3]

Resumes ``RUN_DIR``'s checkpoint (a run with ``buffer.kind=stratified_prioritized``) in a
scratch folder, leaving the run alone, and prints per task: the smallest, median and
largest priority ``q = (|TD error| + eps)^alpha`` its sum tree holds, and over ``--batches``
sampled batches the mean weight of the task's samples under PER's normalisation (divided by
the largest weight in the task, i.e. by its smallest priority; the sampler's until 97f6c26)
and as the sampler gives them now (divided by their mean in the batch: 1). One torch thread.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from d2r_torchrl.data.replay import TaskStratifiedPrioritizedSampler, task_counts
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME
from d2r_torchrl.training.trainer import MultiTaskTrainer


def task_priorities(sampler: TaskStratifiedPrioritizedSampler, counts: torch.Tensor) -> list[torch.Tensor]:
    """Each task's priorities ``q`` as its sum tree holds them (``[n_t]`` per task)."""
    rows = sampler.rows_per_task
    return [
        torch.as_tensor(sampler._sum_tree[torch.arange(int(n)) + task * rows], dtype=torch.float64)
        for task, n in enumerate(counts.tolist())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("config.json", CHECKPOINT_NAME):
            shutil.copy(args.run / name, Path(scratch) / name)
        trainer = MultiTaskTrainer.resume(Path(scratch))
        sampler = trainer.buffer.sampler
        if not isinstance(sampler, TaskStratifiedPrioritizedSampler):
            raise SystemExit(f"{args.run} samples with {type(sampler).__name__}, not per-task prioritized replay.")
        priorities = task_priorities(sampler, task_counts(trainer.buffer.storage, sampler.num_tasks))
        print(f"{args.run.name}: beta {sampler.beta:.3g}")
        print("| task | smallest / median / largest q | mean weight, PER-normalised | mean weight, now |")
        print("|---|---|---|---|")
        batches = [trainer.buffer.sample() for _ in range(args.batches)]
        for task, (name, q) in enumerate(zip(trainer.tasks, priorities)):
            per, now = [], []
            for batch in batches:
                mine = batch["task_id"].reshape(-1) == task
                drawn = q[batch["index"][mine] // sampler.num_tasks]
                per.append(float((drawn / q.min()).pow(-sampler.beta).mean()))
                now.append(float(batch["priority_weight"][mine].mean()))
            print(
                f"| {name} | {q.min():.2g} / {q.median():.3g} / {q.max():.3g} "
                f"| {min(per):.2g}-{max(per):.2g} | {min(now):.2f}-{max(now):.2f} |"
            )


if __name__ == "__main__":
    main()
