"""Replay buffers for multi-task SAC: prioritized per task, per-task stratified, prioritized, uniform.

Stored keys: ``observation``, ``task_id``, ``action``, ``("routing", "path")`` (D2R) and
``next`` (``observation``, ``task_id``, ``reward``, ``done``, ``terminated``,
``truncated``); :func:`prepare_transitions` selects them. Where a transition goes is the
writer's job, whoever writes (``extend`` of any batch shape, ``add``, TorchRL collectors
given ``replay_buffer=``, their worker processes): :class:`TaskWriter` puts it in its own
task's slots and records each task's count, which the per-task samplers
(:class:`TaskStratifiedSampler`, :class:`TaskStratifiedPrioritizedSampler`) stratify on;
:class:`FlatTensorDictWriter` (the other kinds) stores transitions, never trajectories.

Checkpoints (``buffer.dumps``) of a memory-mapped buffer keep the data where it is:
:class:`InPlaceMemmapCheckpointer` flushes the files and records the length, and loading
reopens the files. In-memory buffers are saved whole, on CPU whatever their device.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
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
from torchrl.data.replay_buffers.writers import TensorDictRoundRobinWriter, Writer
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl import argument_checks as check
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
PRIORITIZED_KINDS = ("stratified_prioritized", "prioritized")  # they need torchrl's compiled extension
TASK_WRITES_ATTR = "_d2r_task_writes"  # the storage attribute where TaskWriter publishes its record


def prepare_transitions(batch: TensorDictBase, num_route_logits: int | None = None) -> TensorDictBase:
    """Flatten a collected batch to ``[N]`` and keep the stored keys (:data:`STORED_KEYS`).

    With ``num_route_logits`` (D2R), transitions that carry no behaviour route (e.g.
    collected by a random policy during warm-up) get an all-False route, which the loss
    treats as "no stored route". The order of the transitions does not matter: the
    buffers' writers place each one (:class:`TaskWriter` in its task's slots).
    """
    batch = batch.reshape(-1)
    if num_route_logits is not None and ROUTE_KEY not in batch.keys(True, True):
        batch.set(ROUTE_KEY, torch.zeros(*batch.shape, num_route_logits, dtype=torch.bool, device=batch.device))
    return batch.select(*STORED_KEYS, strict=False)


def flatten_batch(data: TensorDictBase) -> TensorDictBase:
    """``data`` of any batch shape (``[]``, ``[n]``, ``[T, n]``, a collector's ``[T, steps]``)
    as ``[N]`` transitions; refuses anything but a TensorDict."""
    if not isinstance(data, TensorDictBase):
        raise TypeError(
            f"The replay buffer's writer stores TensorDict transitions, got {type(data).__name__}: "
            "write TensorDicts (e.g. a collector's batches)."
        )
    return data.reshape(-1)


class FlatTensorDictWriter(TensorDictRoundRobinWriter):
    """TorchRL's round-robin writer for batches of any shape: a ``[T, steps]`` batch (as
    ``Collector(..., replay_buffer=...)`` writes) is stored as ``T * steps`` transitions,
    never as ``T`` trajectories. Returns the storage positions in ``data``'s batch shape."""

    def add(self, data: TensorDictBase) -> torch.Tensor:
        return self.extend(data)

    def extend(self, data: TensorDictBase) -> torch.Tensor:
        return super().extend(flatten_batch(data)).view(data.batch_size)


class TaskWriter(Writer):
    """Writes every transition into its own task's slots of the storage, whoever writes.

    With ``T`` tasks and capacity ``T * C``, task ``t`` owns positions ``t, t + T, ...,
    t + (C - 1) T`` (slot ``k`` at ``k * T + t``), a ring of ``C`` slots: its ``w``-th
    transition goes to slot ``w % C``, so each task keeps its latest ``C``. Batches of any
    shape are flattened (``[n]``, ``[T, n]``, a collector's ``[T, steps]``; ``add`` takes
    one transition or a ``[T]`` step); each transition's task is read from its stored
    ``task_key`` (int64, one per transition, in ``[0, T)``, else nothing is stored).

    The writer records ``task_writes`` ``[T]`` (int64, every task's transitions written
    since the buffer was emptied; a task holds ``min(task_writes, C)``) in shared memory and
    publishes it on the storage, where :class:`TaskStratifiedSampler` and
    :class:`TaskStratifiedPrioritizedSampler` read it. Workers of TorchRL's multi-process
    collectors (``MultiSyncCollector``/``MultiAsyncCollector`` with ``replay_buffer=``)
    write through copies of the writer that share that record, as TorchRL's round-robin
    writer shares its cursor; the buffer's shared lock orders their writes. The storage
    length is the span up to the furthest written slot (the number of transitions held when
    every task is written equally), so ``buffer[:]`` and sampling read every written slot.
    """

    def __init__(self, num_tasks: int, task_key: NestedKey = "task_id") -> None:
        super().__init__()
        check.positive_int("num_tasks", num_tasks)
        self.num_tasks = num_tasks
        self.task_key = task_key
        self.task_writes = torch.zeros(num_tasks, dtype=torch.long).share_memory_()
        self._total_writes = torch.zeros((), dtype=torch.long).share_memory_()

    def register_storage(self, storage: Storage) -> None:
        if getattr(storage, "ndim", 1) != 1:
            raise ValueError(f"TaskWriter stores transitions in a 1-D storage; got one of ndim={storage.ndim}.")
        if storage.max_size % self.num_tasks:
            raise ValueError(
                f"TaskWriter: the storage's capacity {storage.max_size} must be a multiple of the "
                f"{self.num_tasks} tasks (each task owns capacity // T slots)."
            )
        super().register_storage(storage)
        setattr(storage, TASK_WRITES_ATTR, self.task_writes)

    @property
    def slots_per_task(self) -> int:
        return self._storage.max_size // self.num_tasks

    @property
    def _write_count(self) -> int:  # TorchRL's ``buffer.write_count``
        return int(self._total_writes)

    def add(self, data: TensorDictBase) -> torch.Tensor:
        return self.extend(data)

    def extend(self, data: TensorDictBase) -> torch.Tensor:
        flat = flatten_batch(data)
        task = self._task_ids(flat)
        slots, count = self.num_tasks, self.slots_per_task
        per_task = torch.bincount(task, minlength=slots)
        order = torch.argsort(task, stable=True)
        rank = torch.empty_like(task)
        rank[order] = torch.arange(task.numel()) - (torch.cumsum(per_task, 0) - per_task)[task[order]]
        position = ((self.task_writes[task] + rank) % count) * slots + task
        last = rank >= per_task[task] - count  # a batch holding more than C of a task keeps its latest C
        if not bool(last.all()):
            flat, position_kept = flat[last], position[last]
        else:
            position_kept = position
        position_kept = position_kept.to(flat.device or "cpu")
        flat.set("index", position_kept)
        self._storage.set(position_kept, flat, set_cursor=False)  # the length is set below
        self._storage._set_last_cursor(position_kept)  # TorchRL's record of the last write (checkpointers read it)
        self.task_writes += per_task
        self._total_writes += task.numel()
        held = self.task_writes.clamp_max(count)
        span = torch.where(held > 0, (held - 1) * slots + torch.arange(slots) + 1, 0).max()
        self._storage._len = int(span)
        self._mark_update_entities(position_kept.cpu())
        return position.view(data.batch_size)

    def _task_ids(self, flat: TensorDictBase) -> torch.Tensor:
        """The ``[N]`` task ids of ``flat``; raises unless one integer id in ``[0, T)`` each."""
        task = flat.get(self.task_key, None)
        if task is None:
            raise KeyError(f"TaskWriter: the written data has no {self.task_key!r} entry; every transition needs one.")
        if task.dtype.is_floating_point or task.dtype == torch.bool or task.numel() != flat.numel():
            raise ValueError(
                f"TaskWriter: {self.task_key!r} must hold one integer task id per transition, got "
                f"dtype {task.dtype} and shape {tuple(task.shape)} for {flat.numel()} transitions."
            )
        task = task.reshape(-1).to("cpu", torch.long)
        outside = task[(task < 0) | (task >= self.num_tasks)]
        if outside.numel():
            raise ValueError(
                f"TaskWriter: {self.task_key!r} holds {sorted(set(outside.tolist()))[:8]}, outside the "
                f"{self.num_tasks} tasks [0, {self.num_tasks}); nothing was stored."
            )
        return task

    def _mark_update_entities(self, index: torch.Tensor) -> None:
        """Tell the buffers reading the storage (their samplers) which slots were written."""
        for entity in self._storage._attached_entities_iter():
            entity.mark_update(index)

    def _empty(self, empty_write_count: bool = True) -> None:
        self.task_writes.zero_()
        if empty_write_count:
            self._total_writes.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"task_writes": self.task_writes.tolist(), "write_count": int(self._total_writes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore(state_dict.get("task_writes"), state_dict.get("write_count", state_dict.get("_write_count")))

    def _restore(self, task_writes: Any, write_count: int) -> None:
        """In place, so that every copy sharing the record sees it. A checkpoint of TorchRL's
        round-robin writer (the task-interleaved layout of earlier versions, every task written
        equally) has no per-task record: each task then wrote ``write_count // T``."""
        if task_writes is None:
            task_writes = torch.full((self.num_tasks,), write_count // self.num_tasks)
        self.task_writes.copy_(torch.as_tensor(task_writes, dtype=torch.long))
        self._total_writes.fill_(write_count)

    def dumps(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "metadata.json").write_text(json.dumps(self.state_dict()))

    def loads(self, path) -> None:
        self.load_state_dict(json.loads((Path(path) / "metadata.json").read_text()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks}, task_writes={self.task_writes.tolist()})"


def task_counts(storage: Storage, num_tasks: int) -> torch.Tensor:
    """``[T]`` transitions each task holds in ``storage``, as its :class:`TaskWriter` recorded;
    raises when no such writer fills the storage or its task count differs."""
    task_writes = getattr(storage, TASK_WRITES_ATTR, None)
    if task_writes is None:
        raise RuntimeError(
            "The per-task samplers read each task's count from the buffer's writer: build the buffer with "
            f"writer=TaskWriter({num_tasks}) (make_replay_buffer does)."
        )
    if task_writes.numel() != num_tasks:
        raise ValueError(f"The buffer's TaskWriter has {task_writes.numel()} tasks; its sampler has {num_tasks}.")
    return task_writes.clamp_max(storage.max_size // num_tasks)


def per_task_share(counts: torch.Tensor, batch_size: int) -> int:
    """Each task's share of a ``batch_size`` batch; raises when the batch cannot be shared
    equally among the ``T`` tasks or a task holds no transition yet."""
    num_tasks = counts.numel()
    if batch_size % num_tasks:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {num_tasks} tasks.")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise RuntimeError(
            f"Cannot sample every task's share: tasks {empty} hold no transition yet (of {num_tasks}); "
            "write some of each task first."
        )
    return batch_size // num_tasks


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


class TaskStratifiedSampler(Sampler):
    """Samples ``batch_size // T`` transitions of every task, uniformly among those the task
    holds (as its :class:`TaskWriter` recorded): index ``k * T + t`` with ``k`` uniform in
    ``[0, n_t)``. Raises while a task holds none."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        check.positive_int("num_tasks", num_tasks)
        self.num_tasks = num_tasks

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        counts = task_counts(storage, self.num_tasks)
        per_task = per_task_share(counts, batch_size)
        uniform = torch.rand(per_task, self.num_tasks, dtype=torch.float64, generator=self._rng)
        slot = (uniform * counts).long()
        return (slot * self.num_tasks + torch.arange(self.num_tasks)).reshape(-1), {}

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks})"


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

    The storage is filled by a :class:`TaskWriter` (slot ``k`` of task ``t`` at position
    ``k * T + t``; capacity ``T * C``). TorchRL's sum and min trees hold the priorities
    task-major: storage position ``p`` is tree position ``(p % T) * C + p // T``, so the
    ``n_t`` transitions task ``t`` holds fill the tree range ``[t C, t C + n_t)`` and one
    scan of the sum tree draws the whole batch (``batch_size // T`` masses uniform in each
    range). Sampling raises while a task holds none.

    Within task ``t``, with ``q_i = (p_i + eps) ** alpha``: ``P(i) = q_i / sum_t q`` and the
    importance weight is PER's ``(n P(i)) ** -beta`` divided by its mean over the task's
    samples in the batch, so every task's weights average 1. PER divides by the largest
    weight instead (the task's smallest priority): that scales each task's terms by a
    factor of its own (0.006 to 0.014 in a three-task run at 45k frames), which would
    reweight the tasks in any loss that averages over the batch.

    Bounded priorities: each priority given to :meth:`update_priority` is capped at
    ``max_priority_ratio`` times the median of the priorities given for the same task in
    that call (a sampled batch brings ``batch_size // T`` per task), and new transitions
    enter at their task's latest cap (TorchRL's default, the largest priority so far,
    before the task's first update). So however large its TD error, a transition is drawn
    at most ``max_priority_ratio ** alpha`` times as often as one at its task's median.

    New transitions are read from the writer's per-task record (:meth:`catch_up`, before
    every sample and update), not from the positions a write reports: transitions written
    by collector worker processes (whose copies of this sampler hold no trees) enter the
    trees like local ones. TorchRL fills a missing priority (``buffer.add`` of data without
    ``td_error``) with :attr:`default_priority`, here NaN, which :meth:`update_priority`
    skips. ``tests/test_replay.py`` checks the batch shares, the sampling probabilities,
    the weights and the cap against direct computations.
    """

    STATE_FILE = "task_cap.json"

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
        check.positive_int("num_tasks", num_tasks)
        if max_capacity % num_tasks:
            raise ValueError(f"capacity {max_capacity} is not a multiple of the {num_tasks} tasks.")
        check_priority_ratio(max_priority_ratio)
        super().__init__(max_capacity, alpha, beta, eps=eps, device="cpu")  # CPU trees, whatever the storage
        self.num_tasks = num_tasks
        self.rows_per_task = max_capacity // num_tasks
        self.max_priority_ratio = max_priority_ratio
        self.task_cap = torch.full((num_tasks,), float("nan"), dtype=torch.float64)  # NaN: no update yet
        self.task_marked = torch.zeros(num_tasks, dtype=torch.long)  # each task's writes the trees hold

    def tree_index(self, index: torch.Tensor) -> torch.Tensor:
        """Storage positions -> positions in the task-major trees."""
        return (index % self.num_tasks) * self.rows_per_task + index // self.num_tasks

    @property
    def default_priority(self) -> float:
        """NaN: "no priority given", skipped by :meth:`update_priority` (module docstring)."""
        return float("nan")

    def _require_trees(self) -> None:
        if self._sum_tree is None:
            raise RuntimeError(
                "This copy of TaskStratifiedPrioritizedSampler was sent to a writer process and holds no "
                "priorities: sample and update priorities in the process that built the buffer."
            )

    @torch.no_grad()
    def catch_up(self, storage: Storage) -> None:
        """Enter the transitions written since the last call (by any process) at their task's
        cap: for task ``t``, its writes ``[task_marked_t, task_writes_t)`` (the last ``C``)."""
        if self._sum_tree is None:  # a writer process's copy
            return
        task_writes = getattr(storage, TASK_WRITES_ATTR, None)
        if task_writes is None:
            task_counts(storage, self.num_tasks)  # raises: no TaskWriter
        written = task_writes.clone()
        if bool((self.task_marked < 0).any()):  # restored from an earlier version's checkpoint
            self.task_marked = written
            return
        new = (written - self.task_marked).clamp(0, self.rows_per_task)
        self.task_marked = written
        total = int(new.sum())
        if not total:
            return
        task = torch.repeat_interleave(torch.arange(self.num_tasks), new)
        offset = torch.arange(total) - (torch.cumsum(new, 0) - new)[task]
        slot = (written[task] - new[task] + offset) % self.rows_per_task
        cap = self.task_cap[task]
        fallback = torch.as_tensor(float(super().default_priority), dtype=torch.float64)
        priority = torch.where(torch.isnan(cap), fallback, cap)
        super().update_priority(task * self.rows_per_task + slot, priority.to(torch.float32))

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        self._require_trees()
        self.catch_up(storage)
        counts = task_counts(storage, self.num_tasks)
        per_task = per_task_share(counts, batch_size)
        start = torch.arange(self.num_tasks) * self.rows_per_task
        stop = start + counts
        task_sum = torch.as_tensor(self._sum_tree.query(start, stop), dtype=torch.float64)
        before = torch.cumsum(task_sum, 0) - task_sum  # the tree is zero outside the held slots
        uniform = torch.rand(per_task, self.num_tasks, dtype=torch.float64, generator=self._rng)
        mass = (before + uniform * task_sum).flatten().to(torch.float32)  # the trees' dtype
        found = torch.as_tensor(self._sum_tree.scan_lower_bound(mass))
        found = torch.minimum(torch.maximum(found.view(per_task, -1), start), stop - 1)  # rounding at range ends
        # PER's (n P(i))^-beta is q_i^-beta times a factor per task, which the mean removes
        weight = torch.as_tensor(self._sum_tree[found.flatten()], dtype=torch.float64).view_as(found).pow(-self._beta)
        weight = weight / weight.mean(0)  # [per_task, T]: each task's weights average 1
        index = (found - start) * self.num_tasks + torch.arange(self.num_tasks)
        return index.flatten(), {"priority_weight": weight.flatten().to(torch.float32)}

    @torch.no_grad()
    def update_priority(
        self, index: torch.Tensor | int, priority: torch.Tensor | float, *, storage: Storage | None = None
    ) -> None:
        self._require_trees()
        if storage is not None:
            self.catch_up(storage)  # new transitions first, so that these priorities win
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        priority = torch.as_tensor(priority, dtype=torch.float64).reshape(-1).cpu().expand(index.shape)
        keep = (index >= 0) & ~torch.isnan(priority)  # TorchRL marks entries not to update with -1
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
        """New transitions (the writer's report): entered by :meth:`catch_up` from ``storage``."""
        if storage is None:
            raise ValueError("TaskStratifiedPrioritizedSampler.mark_update needs the storage (the buffer passes it).")
        self.catch_up(storage)

    def _empty(self) -> None:
        super()._empty()
        self.task_cap.fill_(float("nan"))
        self.task_marked.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task_cap": self.task_cap.clone(), "task_marked": self.task_marked.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.task_cap = state_dict["task_cap"].clone()
        self._restore_marked(state_dict.get("task_marked"))

    def _restore_marked(self, task_marked: Any) -> None:
        """A checkpoint of an earlier version (no ``task_marked``) had every write entered at
        once: its trees hold what the restored writer records."""
        self.task_marked = (
            torch.as_tensor(task_marked, dtype=torch.long) if task_marked is not None else torch.full((self.num_tasks,), -1)
        )

    def dumps(self, path) -> None:
        super().dumps(path)
        state = {"task_cap": self.task_cap.tolist(), "task_marked": self.task_marked.tolist()}
        (Path(path) / self.STATE_FILE).write_text(json.dumps(state))

    def loads(self, path) -> None:
        super().loads(path)
        state = json.loads((Path(path) / self.STATE_FILE).read_text())
        if isinstance(state, list):  # earlier versions saved the caps alone
            state = {"task_cap": state}
        self.task_cap = torch.tensor(state["task_cap"], dtype=torch.float64)
        self._restore_marked(state.get("task_marked"))

    def __getstate__(self) -> dict[str, Any]:
        """Sent to a process TorchRL spawns (a collector worker writing into the buffer): a copy
        without the trees, which only the building process samples from and updates."""
        if get_spawning_popen() is None:
            return super().__getstate__()
        state = Sampler.__getstate__(self)
        state["_sum_tree"] = state["_min_tree"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_tasks={self.num_tasks}, alpha={self._alpha}, beta={self._beta}, "
            f"max_priority_ratio={self.max_priority_ratio})"
        )


def stratified_tasks(buffer: ReplayBuffer) -> int | None:
    """``T`` when ``buffer`` samples every task its share (a per-task sampler), else ``None``."""
    sampler = buffer.sampler
    if isinstance(sampler, (TaskStratifiedSampler, TaskStratifiedPrioritizedSampler)):
        return sampler.num_tasks
    return None


def check_priority_ratio(value: float | None) -> None:
    """Raise a one-line ValueError unless ``value`` is None (no cap) or finite and ``>= 1``."""
    if value is not None and not (isinstance(value, (int, float)) and 1 <= value < math.inf):
        raise ValueError(f"max_priority_ratio must be >= 1 and finite (or None for no cap), got {value!r}.")


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

    The per-task kinds write through :class:`TaskWriter` (every transition in its task's
    slots), the others through :class:`FlatTensorDictWriter`, so that any writer (``extend``
    of ``[n]`` or ``[T, n]`` batches, ``add``, TorchRL collectors given ``replay_buffer=``)
    stores transitions. Capacity is rounded down to a multiple of ``num_tasks``; above ``memmap_above``
    transitions the storage is memory-mapped under ``scratch_dir`` (checkpointed in place by
    :class:`InPlaceMemmapCheckpointer`). The prioritized buffers read priorities from
    ``td_error`` (written by the loss), write importance weights to ``priority_weight``
    (read by the loss) and raise :class:`~d2r_torchrl._extension.MissingExtensionError`
    when torchrl's compiled extension is missing. Non-positive or non-finite arguments
    raise a ValueError naming the argument.
    """
    if kind not in BUFFER_KINDS:
        raise ValueError(f"Unknown buffer kind {kind!r}; accepted: {list(BUFFER_KINDS)}.")
    for name, value in (("capacity", capacity), ("batch_size", batch_size), ("num_tasks", num_tasks)):
        check.positive_int(name, value)
    check.non_negative_int("memmap_above", memmap_above)
    check.finite("priority_alpha", priority_alpha, minimum=0.0)
    check.finite("priority_beta", priority_beta, minimum=0.0)
    check_priority_ratio(max_priority_ratio)
    if capacity < num_tasks:
        raise ValueError(f"capacity {capacity} is less than one transition per task ({num_tasks} tasks).")
    capacity -= capacity % num_tasks
    if capacity > memmap_above:
        storage = LazyMemmapStorage(capacity, scratch_dir=scratch_dir or tempfile.mkdtemp(prefix="d2r_buffer_"), device="cpu")
        checkpointer = InPlaceMemmapCheckpointer()
    else:
        storage = LazyTensorStorage(capacity, device=device)
        checkpointer = TensorStorageCheckpointer()
        checkpointer.register_save_hook(_to_cpu)
    common = dict(storage=storage, batch_size=batch_size, prefetch=None)
    if kind in PRIORITIZED_KINDS:
        from d2r_torchrl._extension import require_torchrl_extension

        require_torchrl_extension()
    if kind == "prioritized":
        buffer = TensorDictPrioritizedReplayBuffer(
            alpha=priority_alpha, beta=priority_beta, priority_key="td_error", **common
        )
        buffer.set_writer(FlatTensorDictWriter())
    elif kind == "uniform":
        buffer = TensorDictReplayBuffer(
            sampler=RandomSampler(), writer=FlatTensorDictWriter(), priority_key="td_error", **common
        )
    else:
        sampler = (
            TaskStratifiedPrioritizedSampler(
                capacity, num_tasks, priority_alpha, priority_beta, max_priority_ratio=max_priority_ratio
            )
            if kind == "stratified_prioritized"
            else TaskStratifiedSampler(num_tasks)
        )
        buffer = TensorDictReplayBuffer(sampler=sampler, writer=TaskWriter(num_tasks), priority_key="td_error", **common)
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
