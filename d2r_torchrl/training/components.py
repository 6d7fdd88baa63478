"""What a collector or replay buffer handed to :class:`~d2r_torchrl.training.trainer.MultiTaskTrainer`
must provide, checked before any work, with errors that name what is missing.

* A **collector** (``MultiTaskTrainer.train(collector)``): any TorchRL collector, or anything iterable
  that yields TensorDict batches and has ``update_policy_weights_()`` and ``shutdown()``,
  running the trainer's ``actor``. Each batch must hold :data:`REQUIRED_BATCH_KEYS` with
  ``task_id`` in ``[0, T)``; a D2R actor adds its route ``("routing", "path")`` (batches
  without it, e.g. random warm-up, are stored with an empty route, which the loss treats as
  "no stored route").
* A **replay buffer** (``MultiTaskTrainer(config, buffer=...)``): a TorchRL ``ReplayBuffer`` with a
  batch size, room for more than the warm-up frames, and ``state_dict``/``load_state_dict``
  (TorchRL's own). A prioritized one (a ``PrioritizedSampler``) must be a
  ``TensorDictReplayBuffer`` (it returns ``index`` and ``priority_weight`` with each sample
  and takes ``update_tensordict_priority``) reading its priorities from ``td_error``. A
  per-task sampler of :mod:`d2r_torchrl.data.replay` must be built for the run's ``T`` tasks,
  over a storage of its own capacity, a multiple of ``T``, filled by a
  :class:`~d2r_torchrl.data.replay.TaskWriter` for ``T`` tasks, with a batch size that is a
  multiple of ``T`` (batches may hold the tasks unequally). A
  prioritized buffer's importance-sampling exponent follows the run's schedule
  (``buffer.priority_beta`` to ``buffer.priority_beta_final``).
"""
from __future__ import annotations

from typing import Any

from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import PrioritizedSampler

from d2r_torchrl.data.replay import TaskWriter, stratified_tasks

REQUIRED_BATCH_KEYS = (
    "observation",
    "task_id",
    "action",
    ("next", "observation"),
    ("next", "task_id"),
    ("next", "reward"),
    ("next", "done"),
    ("next", "terminated"),
)
COLLECTOR_METHODS = ("__iter__", "update_policy_weights_", "shutdown")


class ComponentError(TypeError):
    """A collector or replay buffer given to the trainer lacks what the trainer needs."""


def describe_buffer(buffer: ReplayBuffer) -> str:
    """``"TensorDictReplayBuffer(sampler=..., storage=...(capacity))"``: what a resumed run
    compares to make sure it gets the same kind of buffer back."""
    storage = buffer.storage
    return (
        f"{type(buffer).__name__}(sampler={type(buffer.sampler).__name__}, "
        f"storage={type(storage).__name__}({storage.max_size}))"
    )


def check_buffer(buffer: Any, num_tasks: int, warmup_frames: int, priority_key: str) -> None:
    """Raise :class:`ComponentError` unless ``buffer`` can serve the trainer (module docstring)."""
    if not isinstance(buffer, ReplayBuffer):
        raise ComponentError(
            f"buffer must be a torchrl.data.ReplayBuffer (e.g. TensorDictReplayBuffer or "
            f"TensorDictPrioritizedReplayBuffer), got {type(buffer).__name__}."
        )
    name = describe_buffer(buffer)
    if buffer.batch_size is None:
        raise ComponentError(f"{name} has no batch size: build it with batch_size=... (the update's batch).")
    if buffer.storage.max_size <= warmup_frames:
        raise ComponentError(
            f"{name} holds {buffer.storage.max_size} transitions, not more than the {warmup_frames} "
            "warm-up frames (collector.warmup_rounds x collector.steps_per_task x tasks): no update would run."
        )
    if isinstance(buffer.sampler, PrioritizedSampler):
        if not isinstance(buffer, TensorDictReplayBuffer):
            raise ComponentError(
                f"{name} samples by priority but is not a TensorDictReplayBuffer, so its samples carry no "
                "'index' to update priorities with: use TensorDictPrioritizedReplayBuffer."
            )
        if buffer.priority_key != priority_key:
            raise ComponentError(
                f"{name} reads priorities from {buffer.priority_key!r}; the loss writes them to "
                f"{priority_key!r}: build it with priority_key={priority_key!r}."
            )
    sampler_tasks = stratified_tasks(buffer)
    if sampler_tasks is None:
        return
    if sampler_tasks != num_tasks:
        raise ComponentError(f"{name} is built for {sampler_tasks} tasks; this run has {num_tasks}.")
    for what, size in (("batch size", buffer.batch_size), ("capacity", buffer.storage.max_size)):
        if size % num_tasks:
            raise ComponentError(
                f"{name} keeps and samples every task equally: its {what} {size} must be a multiple of the "
                f"{num_tasks} tasks."
            )
    sampler_size = getattr(buffer.sampler, "max_size", buffer.storage.max_size)
    if sampler_size != buffer.storage.max_size:
        raise ComponentError(f"{name}: its sampler holds {sampler_size} priorities for {buffer.storage.max_size} slots.")
    writer = buffer.writer
    if not isinstance(writer, TaskWriter) or writer.num_tasks != num_tasks:
        raise ComponentError(
            f"{name} samples each task from the counts its writer records, but its writer is {writer!r}: "
            f"build it with writer=TaskWriter({num_tasks})."
        )


def check_collector(collector: Any) -> None:
    """Raise :class:`ComponentError` unless ``collector`` has :data:`COLLECTOR_METHODS`."""
    missing = [name for name in COLLECTOR_METHODS if not callable(getattr(collector, name, None))]
    if missing:
        raise ComponentError(
            f"The collector ({type(collector).__name__}) lacks {', '.join(missing)}: the trainer iterates "
            "over it for TensorDict batches, sends it the policy weights after each round's updates "
            "(update_policy_weights_()) and shuts it down at the end (shutdown()); any TorchRL collector "
            "built over trainer.actor has them."
        )


def check_batch(batch: Any, num_tasks: int) -> None:
    """Raise :class:`ComponentError` unless a collected ``batch`` holds the keys the trainer
    stores (:data:`REQUIRED_BATCH_KEYS`) with task ids in ``[0, num_tasks)``."""
    if not isinstance(batch, TensorDictBase):
        raise ComponentError(f"The collector yielded a {type(batch).__name__}; the trainer needs TensorDict batches.")
    present = set(batch.keys(True, True))
    missing = [key for key in REQUIRED_BATCH_KEYS if key not in present]
    if missing:
        raise ComponentError(
            f"A collected batch lacks {missing} (it holds {sorted(map(str, present))}): collect with a "
            "Meta-World env of d2r_torchrl.envs.make_env, or one that writes the same keys."
        )
    task_id = batch.get("task_id")
    if task_id.numel() and (int(task_id.min()) < 0 or int(task_id.max()) >= num_tasks):
        raise ComponentError(
            f"A collected batch has task ids {int(task_id.min())}..{int(task_id.max())}; this run has "
            f"{num_tasks} tasks (ids 0..{num_tasks - 1})."
        )
