"""Checkpoints through ``torchrl.checkpoint.Checkpoint``: atomic on disk, loadable on another
device, and refused with a clear message when they do not belong to the run.

``Checkpoint.save`` stages the archive and then swaps it in with two renames (the old
checkpoint aside, the new one in place); a process killed between them leaves no checkpoint.
:func:`save` therefore writes the archive under a temporary name, flushes it and renames it
over ``run_dir/checkpoint`` in one step. Empty replay buffers are left out.
"""
from __future__ import annotations

import errno
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, NamedTuple

import torch
from torchrl.checkpoint import Checkpoint, CheckpointError, GlobalRNGState
from torchrl.data import ReplayBuffer
from torchrl.data.replay_buffers.samplers import PrioritizedSampler

from d2r_torchrl.data.replay import fsync_path, is_memory_mapped
from d2r_torchrl.training.config import RESUME_OVERRIDES, differences

CHECKPOINT_NAME = "checkpoint"
PARTIAL_NAME = f".{CHECKPOINT_NAME}.partial"
# What a save interrupted by a crash can leave next to the checkpoint: the partial archive and
# torchrl's staging files (named ".<destination>.stage-<id>", "...archive-<id>", "...backup-<id>").
_LEFTOVER_PATTERNS = (f".{CHECKPOINT_NAME}.*", f".{PARTIAL_NAME}.*")


GIB, MIB = 2**30, 2**20


def size_text(size: int) -> str:
    """``"1.50 GiB"``, or ``"12.3 MiB"`` below one GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.1f} MiB"


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (missing, corrupt or incompatible checkpoint)."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous one, if any, is kept."""


class SaveSize(NamedTuple):
    """Bytes of one checkpoint archive: ``states`` (networks, targets, temperatures, optimiser
    states) and ``buffer`` (the replay buffer's transitions when held in memory, its
    priority trees). A save writes the archive twice: a staged copy, then the archive."""

    states: int
    buffer: int

    @property
    def needed(self) -> int:
        """Free disk space a save takes while it runs, with a margin for what the tensors
        leave out (RNG states, manifest, archive headers)."""
        return 2 * (int(1.02 * (self.states + self.buffer)) + MIB)

    def describe(self) -> str:
        parts = f"networks and optimisers {size_text(self.states)}"
        if self.buffer:
            parts += f", replay buffer {size_text(self.buffer)}"
        return f"a checkpoint save needs {size_text(self.needed)} (twice the archive: {parts})"


def state_bytes(components: Iterable[torch.nn.Module | torch.optim.Optimizer]) -> int:
    """Bytes of the state of modules (their state dicts) and Adam optimisers (two moments per
    parameter, also before the first step)."""
    total = 0
    for component in components:
        if isinstance(component, torch.optim.Optimizer):
            params = [p for group in component.param_groups for p in group["params"]]
            total += 2 * sum(p.numel() * p.element_size() for p in params)
        else:
            total += sum(t.numel() * t.element_size() for t in component.state_dict().values())
    return total


def buffer_bytes(buffer: ReplayBuffer, bytes_per_transition: int) -> int:
    """Bytes a checkpoint holds for ``buffer`` when full: its transitions when held in memory
    (memory-mapped files stay in place) and a prioritized sampler's sum and min trees (one
    float64 each per slot)."""
    capacity = buffer.storage.max_size
    stored = 0 if is_memory_mapped(buffer) else capacity * bytes_per_transition
    trees = 2 * 8 * capacity if isinstance(buffer.sampler, PrioritizedSampler) else 0
    return stored + trees


class Counters:
    """Training progress saved with every checkpoint.

    ``pending_updates`` are the updates of the last collected batch not run yet because a
    stop signal came first; ``batch_start_frames`` is the frame count before that batch;
    ``pending_evaluation`` is 1 when a stop signal cut that batch's evaluation short.
    """

    FIELDS = ("rounds", "frames", "updates", "pending_updates", "batch_start_frames", "pending_evaluation")
    ADDED_LATER = {"pending_evaluation": 0}  # what checkpoints written before a field existed hold

    def __init__(self) -> None:
        self.rounds = self.frames = self.updates = self.pending_updates = self.batch_start_frames = 0
        self.pending_evaluation = 0

    def state_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(state[name] if name in state else self.ADDED_LATER[name]))


class PortableRNGState(GlobalRNGState):
    """Process-global RNG state (Python, NumPy, torch, CUDA) that also loads where the CUDA
    devices it was saved with are missing: their states are skipped (a CUDA checkpoint on a
    CPU machine) or cut to the devices present."""

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        cuda_states = state.pop("torch_cuda", None)
        if cuda_states is not None and torch.cuda.is_available():
            state["torch_cuda"] = list(cuda_states)[: torch.cuda.device_count()]
        super().load_state_dict(state)


def make_checkpoint(components: dict[str, Any]) -> Checkpoint:
    """A single-archive checkpoint of ``components`` plus the global RNG state."""
    return Checkpoint(format="archive", rng=PortableRNGState(), **components)


def remove_leftovers(run_dir: Path) -> None:
    """Delete what interrupted saves left in ``run_dir`` (never the checkpoint itself)."""
    for pattern in _LEFTOVER_PATTERNS:
        for path in run_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def save(
    checkpoint: Checkpoint, run_dir: Path, metadata: dict[str, Any], size: Callable[[], SaveSize] | None = None
) -> Path:
    """Write ``run_dir/checkpoint`` atomically: a crash at any moment leaves either the previous
    checkpoint or the new one, both whole. Empty replay buffers are not saved. An ``OSError``
    (a full disk) removes what the save wrote and raises :class:`SaveError`, which says what
    a save needs (``size()``) when the disk is full."""
    remove_leftovers(run_dir)
    selected = [
        name
        for name, value in checkpoint.components.items()
        if not (isinstance(value, ReplayBuffer) and len(value) == 0)
    ]
    destination = run_dir / CHECKPOINT_NAME
    try:
        partial = checkpoint.save(run_dir / PARTIAL_NAME, components=selected, metadata=metadata)
        fsync_path(partial)
        os.replace(partial, destination)
        fsync_path(run_dir)
    except OSError as error:
        remove_leftovers(run_dir)
        raise SaveError(_save_failure(error, run_dir, size)) from error
    return destination


def _save_failure(error: OSError, run_dir: Path, size: Callable[[], SaveSize] | None) -> str:
    previous = run_dir / CHECKPOINT_NAME
    kept = f"the previous checkpoint {previous} is kept" if previous.exists() else "no checkpoint was saved yet"
    what = f"Cannot write the checkpoint in {run_dir} ({error.strerror or error})"
    if error.errno == errno.ENOSPC and size is not None:
        free = shutil.disk_usage(run_dir).free
        what += f": {size().describe()}, {size_text(free)} are free"
    return f"{what}; {kept}. Free some space (or set log.root on a larger disk) and resume the run."


def verify(run_dir: Path) -> None:
    """Read every member of ``run_dir/checkpoint`` and check its CRC; raises
    :class:`ResumeError` for a damaged archive. Reads only."""
    path = run_dir / CHECKPOINT_NAME
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        damage = None if bad_member is None else f"its member {bad_member} fails the CRC check"
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as error:
        damage = f"{type(error).__name__}: {error}"
    if damage is not None:
        raise ResumeError(
            f"Checkpoint {path} is damaged ({damage}); nothing in {run_dir} was changed. Restore a good copy "
            "or start a new run."
        )


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """The metadata recorded in ``run_dir/checkpoint`` (reads the manifest only)."""
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        raise ResumeError(f"No checkpoint at {path}: nothing to resume in {run_dir}.")
    try:
        return dict(Checkpoint.manifest(path).get("metadata", {}))
    except (CheckpointError, OSError, ValueError) as error:
        raise ResumeError(f"Checkpoint {path} is corrupt ({error}). It was left untouched.") from error


def check_belongs(run_dir: Path, metadata: Mapping[str, Any], config: dict[str, Any], version: str) -> None:
    """Raise :class:`ResumeError` unless the checkpoint was written by this code ``version``
    with the configuration ``config`` (``run_dir/config.json``); the message lists what differs."""
    path = run_dir / CHECKPOINT_NAME
    if "config" not in metadata or "version" not in metadata:
        raise ResumeError(
            f"Checkpoint {path} records no configuration or code version: it was written by an older "
            "d2r-torchrl and cannot be continued by this one. Start a new run."
        )
    problems = []
    if metadata["version"] != version:
        problems.append(f"it was written by d2r-torchrl {metadata['version']}, this is {version}")
    changed = differences(metadata["config"], config, ignore=RESUME_OVERRIDES)
    if changed:
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        problems.append(f"its configuration differs from {run_dir / 'config.json'} ({listed})")
    if problems:
        raise ResumeError(
            f"Checkpoint {path} does not belong to this run: {'; '.join(problems)}. Restore the "
            "matching config.json or code version, or start a new run."
        )


def load(checkpoint: Checkpoint, run_dir: Path, map_location: Any = None) -> Collection[str]:
    """Restore the registered components from ``run_dir/checkpoint``, moving tensors to
    ``map_location``; a replay buffer saved empty is skipped. Returns the names restored.
    Raises :class:`ResumeError`."""
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        raise ResumeError(f"No checkpoint at {path}: nothing to resume in {run_dir}.")
    try:
        saved = Checkpoint.manifest(path)["components"]
        requested = [
            name
            for name, value in checkpoint.components.items()
            if name in saved or not isinstance(value, ReplayBuffer)
        ]
        return checkpoint.load(path, components=requested, map_location=map_location).loaded
    except (CheckpointError, RuntimeError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ResumeError(
            f"Checkpoint {path} is corrupt or does not match this configuration ({type(error).__name__}: "
            f"{_shorten(str(error))}). It was left untouched; start a new run or restore a good copy."
        ) from error


def _shorten(text: str, limit: int = 300) -> str:
    """First ``limit`` characters of an error text (state-dict errors print whole tensors)."""
    return text if len(text) <= limit else text[:limit] + " ..."
