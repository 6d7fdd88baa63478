"""Replay buffers for multi-task SAC: prioritized per task, per-task stratified, prioritized, uniform.

Stored keys: ``observation``, ``task_id``, ``action``, ``("routing", "path")`` (D2R) and
``next`` (``observation``, ``task_id``, ``reward``, ``done``, ``terminated``,
``truncated``). :func:`prepare_transitions` selects them and, for the per-task samplers
(:class:`TaskStratifiedSampler`, :class:`TaskStratifiedPrioritizedSampler`), lays a collected
batch out task-interleaved (position ``p`` holds task ``p % T``).

Checkpoints (``buffer.dumps``) of a memory-mapped buffer keep the data where it is:
:class:`InPlaceMemmapCheckpointer` flushes the files and records the length, and loading
reopens the files. In-memory buffers are saved whole, on CPU whatever their device.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import (
    LazyMemmapStorage,
    LazyTensorStorage,
    ReplayBuffer,
    TensorDictPrioritizedReplayBuffer,
    TensorDictReplayBuffer,
)
from torchrl.data.replay_buffers.checkpointers import StorageCheckpointerBase, TensorStorageCheckpointer
from torchrl.data.replay_buffers.samplers import PrioritizedSampler, RandomSampler, Sampler
from torchrl.data.replay_buffers.storages import Storage
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.modules.actor_critic import ROUTE_KEY

STORED_KEYS = (
    "observation",
    "task_id",
    "action",
    ROUTE_KEY,
    ("next", "observation"),
    ("next", "task_id"),
    ("next", "reward"),
    ("next", "done"),
    ("next", "terminated"),
    ("next", "truncated"),
)
BUFFER_KINDS = ("stratified_prioritized", "stratified", "prioritized", "uniform")


def prepare_transitions(
    batch: TensorDictBase, num_route_logits: int | None = None, num_tasks: int | None = None
) -> TensorDictBase:
    """Flatten a collected batch to ``[N]`` and keep the stored keys.

    With ``num_route_logits`` (D2R), transitions that carry no behaviour route (e.g.
    collected by a random policy during warm-up) get an all-False route, which the loss
    treats as "no stored route". With ``num_tasks`` the tasks are interleaved (position
    ``p`` holds task ``p % T``), as :class:`TaskStratifiedSampler` needs; every task must
    then contribute the same number of transitions.
    """
    batch = batch.reshape(-1)
    if num_route_logits is not None and ROUTE_KEY not in batch.keys(True, True):
        batch.set(ROUTE_KEY, torch.zeros(*batch.shape, num_route_logits, dtype=torch.bool, device=batch.device))
    batch = batch.select(*STORED_KEYS, strict=False)
    if num_tasks is None:
        return batch
    task_id = batch.get("task_id").reshape(-1)
    counts = torch.bincount(task_id, minlength=num_tasks)
    if counts.numel() != num_tasks or not bool((counts == counts[0]).all()):
        raise ValueError(
            f"Collected batch has unequal transitions per task {counts.tolist()}; "
            "the stratified layout needs every task equally represented."
        )
    order = torch.argsort(task_id, stable=True)
    return batch[order].reshape(num_tasks, -1).transpose(0, 1).reshape(-1)


class InPlaceMemmapCheckpointer(StorageCheckpointerBase):
    """Checkpoints a :class:`~torchrl.data.LazyMemmapStorage` without copying its data.

    ``dumps`` flushes the memory-mapped files under the storage's ``scratch_dir`` to disk and
    writes only the storage length to the checkpoint; ``loads`` reopens those files and
    restores the length. The files must still be there when loading (same run directory).
    After a stop signal they hold exactly the checkpoint's transitions; after a crash they
    may also hold some collected after it, which replace older ones only once the buffer
    has wrapped around (at most one checkpoint interval's worth).
    """

    METADATA = "memmap_storage.json"

    def dumps(self, storage: LazyMemmapStorage, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if storage.initialized:
            for file in Path(storage.scratch_dir).rglob("*"):
                if file.is_file():
                    fsync_path(file)
        metadata = {"len": len(storage), "initialized": storage.initialized, "scratch_dir": storage.scratch_dir}
        (path / self.METADATA).write_text(json.dumps(metadata))

    def loads(self, storage: LazyMemmapStorage, path) -> None:
        metadata = json.loads((Path(path) / self.METADATA).read_text())
        if not metadata["initialized"]:
            return
        scratch_dir = Path(storage.scratch_dir)
        if not (scratch_dir / "meta.json").exists():
            raise FileNotFoundError(
                f"The memory-mapped replay buffer files are missing from {scratch_dir} "
                f"(the checkpoint was written with them in {metadata['scratch_dir']})."
            )
        # as TorchRL's own checkpointers do when the data already sits at the load path
        storage._storage = TensorDict.load_memmap(scratch_dir)
        storage.initialized = True
        storage._len = metadata["len"]


def fsync_path(path: Path) -> None:
    """Flush a file (memory-mapped writes included) or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_memory_mapped(buffer: ReplayBuffer) -> bool:
    """Whether ``buffer`` stores its transitions in memory-mapped files."""
    return isinstance(buffer.storage, LazyMemmapStorage)


def _to_cpu(data: TensorDictBase, path=None) -> TensorDictBase:
    """Save hook: an in-memory storage is written from CPU, so that the checkpoint loads
    on a machine without the device it was collected on."""
    return data.to("cpu")


def stored_rows_and_share(stored: int, batch_size: int, num_tasks: int) -> tuple[int, int]:
    """``(rows, per_task)`` of a task-interleaved storage holding ``stored`` transitions: the
    rows of ``T`` it holds and each task's share of a ``batch_size`` batch; raises when the
    batch cannot be shared equally or no row is stored yet."""
    if batch_size % num_tasks:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {num_tasks} tasks.")
    if stored < num_tasks:
        raise RuntimeError("Cannot sample from a replay buffer holding less than one row of tasks.")
    return stored // num_tasks, batch_size // num_tasks


class TaskStratifiedSampler(Sampler):
    """Samples ``batch_size // T`` transitions of every task, uniformly within each task.

    Relies on the task-interleaved layout of :func:`prepare_transitions` (position ``p``
    holds task ``p % T``) and on a capacity that is a multiple of ``T``.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks

    def sample(self, storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        rows, per_task = stored_rows_and_share(len(storage), batch_size, self.num_tasks)
        row = torch.randint(rows, (per_task, self.num_tasks))
        index = row * self.num_tasks + torch.arange(self.num_tasks)
        return index.reshape(-1), {}

    def _empty(self) -> None:
        pass

    def dumps(self, path) -> None:
        pass

    def loads(self, path) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def per_task_median(values: torch.Tensor, task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Median of ``values`` ``[B]`` over each task's entries (``task`` ``[B]``) -> ``[T]``
    (NaN for a task with no entry; the lower middle value for an even count)."""
    order = torch.argsort(task, stable=True)
    counts = torch.bincount(task, minlength=num_tasks)
    first = torch.cumsum(counts, 0) - counts
    sorted_task = task[order]
    slot = torch.arange(task.numel(), device=task.device) - first[sorted_task]
    table = values.new_full((num_tasks, int(counts.max())), float("nan"))
    table[sorted_task, slot] = values[order]
    return table.nanmedian(1).values


class TaskStratifiedPrioritizedSampler(PrioritizedSampler):
    """Prioritized replay within each task; every task gets ``batch_size // T`` of the batch.

    The storage layout is that of :class:`TaskStratifiedSampler` (position ``p`` holds task
    ``p % T``; capacity a multiple of ``T``). TorchRL's sum and min trees hold the
    priorities task-major instead: storage position ``p`` is tree position
    ``(p % T) * C + p // T`` with ``C = capacity // T``, so the ``n = len(storage) // T``
    stored rows of task ``t`` fill the tree range ``[t C, t C + n)`` and one scan of the
    sum tree draws the whole batch (``batch_size // T`` masses uniform in each range).

    Within task ``t``, with ``q_i = (p_i + eps) ** alpha``: ``P(i) = q_i / sum_t q`` and the
    importance weight is ``(q_i / min_t q) ** -beta``, i.e. PER's ``(n P(i)) ** -beta``
    divided by its largest value in the task.

    Bounded priorities: each priority given to :meth:`update_priority` is capped at
    ``max_priority_ratio`` times the median of the priorities given for the same task in
    that call (a sampled batch brings ``batch_size // T`` per task), and new transitions
    (:meth:`mark_update`) enter at their task's latest cap (TorchRL's default, the largest
    priority so far, before the task's first update). So however large its TD error, a
    transition is drawn at most ``max_priority_ratio ** alpha`` times as often as one at
    its task's median. ``tests/test_replay.py`` checks the batch shares, the
    sampling probabilities, the weights and the cap against direct computations.
    """

    TASK_CAP_FILE = "task_cap.json"

    def __init__(
        self,
        max_capacity: int,
        num_tasks: int,
        alpha: float,
        beta: float,
        *,
        max_priority_ratio: float | None = 10.0,
        eps: float = 1e-8,
    ) -> None:
        if max_capacity % num_tasks:
            raise ValueError(f"capacity {max_capacity} is not a multiple of the {num_tasks} tasks.")
        if max_priority_ratio is not None and max_priority_ratio < 1:
            raise ValueError(f"max_priority_ratio must be >= 1 (or None for no cap), got {max_priority_ratio}.")
        super().__init__(max_capacity, alpha, beta, eps=eps, device="cpu")  # CPU trees, whatever the storage
        self.num_tasks = num_tasks
        self.rows_per_task = max_capacity // num_tasks
        self.max_priority_ratio = max_priority_ratio
        self.task_cap = torch.full((num_tasks,), float("nan"), dtype=torch.float64)  # NaN: no update yet

    def tree_index(self, index: torch.Tensor) -> torch.Tensor:
        """Storage positions -> positions in the task-major trees."""
        return (index % self.num_tasks) * self.rows_per_task + index // self.num_tasks

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        rows, per_task = stored_rows_and_share(len(storage), batch_size, self.num_tasks)
        start = torch.arange(self.num_tasks) * self.rows_per_task
        stop = start + rows
        task_sum = torch.as_tensor(self._sum_tree.query(start, stop), dtype=torch.float64)
        task_min = torch.as_tensor(self._min_tree.query(start, stop), dtype=torch.float64)
        before = torch.cumsum(task_sum, 0) - task_sum  # the tree is zero outside the stored rows
        uniform = torch.rand(per_task, self.num_tasks, dtype=torch.float64, generator=self._rng)
        mass = (before + uniform * task_sum).flatten().to(torch.float32)  # the trees' dtype
        found = torch.as_tensor(self._sum_tree.scan_lower_bound(mass))
        found = torch.minimum(torch.maximum(found.view(per_task, -1), start), stop - 1)  # rounding at range ends
        weight = (torch.as_tensor(self._sum_tree[found.flatten()]).view_as(found) / task_min).pow(-self._beta)
        index = (found - start) * self.num_tasks + torch.arange(self.num_tasks)
        return index.flatten(), {"priority_weight": weight.flatten().to(torch.float32)}

    @torch.no_grad()
    def update_priority(
        self, index: torch.Tensor | int, priority: torch.Tensor | float, *, storage: Storage | None = None
    ) -> None:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        priority = torch.as_tensor(priority, dtype=torch.float64).reshape(-1).cpu().expand(index.shape)
        keep = index >= 0  # TorchRL marks entries not to update with -1
        index, priority = index[keep], priority[keep]
        if index.numel() == 0:
            return
        if self.max_priority_ratio is not None:
            task = index % self.num_tasks
            cap = self.max_priority_ratio * per_task_median(priority, task, self.num_tasks)
            self.task_cap = torch.where(torch.isnan(cap), self.task_cap, cap)
            priority = torch.minimum(priority, cap[task])
        super().update_priority(self.tree_index(index), priority.to(torch.float32))  # the trees' dtype

    @torch.no_grad()
    def mark_update(self, index: torch.Tensor | int, *, storage: Storage | None = None) -> None:
        """New transitions: their task's latest cap, or TorchRL's default priority before it."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        cap = self.task_cap[index % self.num_tasks]
        priority = torch.where(torch.isnan(cap), torch.as_tensor(self.default_priority, dtype=torch.float64), cap)
        super().update_priority(self.tree_index(index), priority.to(torch.float32))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task_cap": self.task_cap.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.task_cap = state_dict["task_cap"].clone()

    def dumps(self, path) -> None:
        super().dumps(path)
        (Path(path) / self.TASK_CAP_FILE).write_text(json.dumps(self.task_cap.tolist()))

    def loads(self, path) -> None:
        super().loads(path)
        self.task_cap = torch.tensor(json.loads((Path(path) / self.TASK_CAP_FILE).read_text()), dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_tasks={self.num_tasks}, alpha={self._alpha}, beta={self._beta}, "
            f"max_priority_ratio={self.max_priority_ratio})"
        )


def task_interleaving(buffer: ReplayBuffer) -> int | None:
    """``T`` when ``buffer``'s sampler needs the task-interleaved layout of
    :func:`prepare_transitions` (the per-task samplers), else ``None``."""
    sampler = buffer.sampler
    if isinstance(sampler, (TaskStratifiedSampler, TaskStratifiedPrioritizedSampler)):
        return sampler.num_tasks
    return None


def annealed_beta(start: float, final: float, progress: float) -> float:
    """PER's importance-sampling exponent, linear from ``start`` to ``final`` as ``progress``
    goes from 0 to 1 (clamped)."""
    return start + (final - start) * min(max(progress, 0.0), 1.0)


def make_replay_buffer(
    kind: str,
    *,
    capacity: int,
    batch_size: int,
    num_tasks: int,
    memmap_above: int = 2_000_000,
    scratch_dir: str | None = None,
    priority_alpha: float = 0.6,
    priority_beta: float = 0.4,
    max_priority_ratio: float | None = 10.0,
    device: torch.device | str = "cpu",
) -> TensorDictReplayBuffer:
    """A TorchRL replay buffer of ``kind`` in :data:`BUFFER_KINDS`.

    * ``stratified_prioritized``: :class:`TaskStratifiedPrioritizedSampler` (every task its
      share of the batch, priorities within a task, capped at ``max_priority_ratio`` times
      the task's median);
    * ``stratified``: :class:`TaskStratifiedSampler` (uniform within each task, as the reference);
    * ``prioritized``: TorchRL's ``TensorDictPrioritizedReplayBuffer`` over all tasks;
    * ``uniform``: uniform over all transitions.

    Capacity is rounded down to a multiple of ``num_tasks``; above ``memmap_above``
    transitions the storage is memory-mapped under ``scratch_dir`` (checkpointed in place by
    :class:`InPlaceMemmapCheckpointer`). The prioritized buffers read priorities from
    ``td_error`` (written by the loss), write importance weights to ``priority_weight``
    (read by the loss) and raise :class:`~d2r_torchrl._extension.MissingExtensionError`
    when torchrl's compiled extension is missing.
    """
    if kind not in BUFFER_KINDS:
        raise ValueError(f"Unknown buffer kind {kind!r}; accepted: {list(BUFFER_KINDS)}.")
    capacity = max(num_tasks, capacity - capacity % num_tasks)
    if capacity > memmap_above:
        storage = LazyMemmapStorage(capacity, scratch_dir=scratch_dir or tempfile.mkdtemp(prefix="d2r_buffer_"), device="cpu")
        checkpointer = InPlaceMemmapCheckpointer()
    else:
        storage = LazyTensorStorage(capacity, device=device)
        checkpointer = TensorStorageCheckpointer()
        checkpointer.register_save_hook(_to_cpu)
    common = dict(storage=storage, batch_size=batch_size, prefetch=None)
    if kind in ("prioritized", "stratified_prioritized"):
        from d2r_torchrl._extension import require_torchrl_extension

        require_torchrl_extension()
    if kind == "prioritized":
        buffer = TensorDictPrioritizedReplayBuffer(
            alpha=priority_alpha, beta=priority_beta, priority_key="td_error", **common
        )
    else:
        samplers = {
            "stratified_prioritized": lambda: TaskStratifiedPrioritizedSampler(
                capacity, num_tasks, priority_alpha, priority_beta, max_priority_ratio=max_priority_ratio
            ),
            "stratified": lambda: TaskStratifiedSampler(num_tasks),
            "uniform": RandomSampler,
        }
        buffer = TensorDictReplayBuffer(sampler=samplers[kind](), priority_key="td_error", **common)
    buffer.storage.checkpointer = checkpointer  # after the buffer's set-up, which installs the default one
    return buffer


def example_transitions(
    num_tasks: int, observation_dim: int, action_dim: int, num_route_logits: int | None = None
) -> TensorDictBase:
    """One all-zero transition per task ``[T]`` with the keys, shapes and dtypes the env and the
    actor write (the stored keys of :func:`prepare_transitions`), e.g. to size a buffer."""
    def flags() -> torch.Tensor:
        return torch.zeros(num_tasks, 1, dtype=torch.bool)

    step = {"observation": torch.zeros(num_tasks, observation_dim), "task_id": torch.arange(num_tasks)}
    batch = TensorDict(
        {
            **step,
            "action": torch.zeros(num_tasks, action_dim),
            "next": {**step, "reward": torch.zeros(num_tasks, 1), "done": flags(), "terminated": flags(), "truncated": flags()},
        },
        batch_size=[num_tasks],
    )
    return prepare_transitions(batch, num_route_logits)


def random_transitions(
    actor: TensorDictModuleBase,
    num_tasks: int,
    batch_size: int,
    observation_dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> TensorDictBase:
    """``[batch_size]`` synthetic transitions to time or test an update: sample ``i`` of task
    ``i % T``, standard-normal observations and next observations, uniform rewards in
    ``[0, 1)``, no terminal flags; actions (and D2R behaviour routes) drawn by ``actor``
    with exploration. ``generator`` (CPU) draws everything but the actor's noise."""
    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    task_id = torch.arange(batch_size, device=device) % num_tasks
    batch = TensorDict(observation=normal(batch_size, observation_dim), task_id=task_id, batch_size=[batch_size])
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        actor(batch)
    flags = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
    batch["next"] = TensorDict(
        observation=normal(batch_size, observation_dim),
        task_id=task_id,
        reward=torch.rand(batch_size, 1, generator=generator).to(device),
        done=flags,
        terminated=flags.clone(),
        batch_size=[batch_size],
    )
    return batch


def transition_bytes(kind: str, example: TensorDictBase, num_tasks: int) -> int:
    """Bytes one transition takes in a buffer of ``kind``, measured on a small in-memory buffer
    holding ``example`` (transitions from :func:`prepare_transitions`, one per task): the
    stored keys plus what the buffer adds (TorchRL's ``index``)."""
    probe = make_replay_buffer(kind, capacity=example.numel(), batch_size=1, num_tasks=num_tasks)
    probe.extend(example)
    stored = probe[:]
    leaves = stored.values(include_nested=True, leaves_only=True)
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves) // stored.numel()
