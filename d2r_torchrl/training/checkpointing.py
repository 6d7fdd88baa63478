"""Checkpoints through ``torchrl.checkpoint.Checkpoint``: atomic on disk, loadable on another
device, and refused with a clear message when they do not belong to the run.

``Checkpoint.save`` stages the archive and then swaps it in with two renames (the old
checkpoint aside, the new one in place); a process killed between them leaves no checkpoint.
:func:`save` therefore writes the archive under a temporary name, flushes it and renames it
over ``run_dir/checkpoint`` in one step. Empty replay buffers are left out.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Collection, Mapping

import torch
from torchrl.checkpoint import Checkpoint, CheckpointError, GlobalRNGState
from torchrl.data import ReplayBuffer

from d2r_torchrl.data.replay import fsync_path
from d2r_torchrl.training.config import RESUME_OVERRIDES, differences

CHECKPOINT_NAME = "checkpoint"
PARTIAL_NAME = f".{CHECKPOINT_NAME}.partial"
# What a save interrupted by a crash can leave next to the checkpoint: the partial archive and
# torchrl's staging files (named ".<destination>.stage-<id>", "...archive-<id>", "...backup-<id>").
_LEFTOVER_PATTERNS = (f".{CHECKPOINT_NAME}.*", f".{PARTIAL_NAME}.*")


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (missing, corrupt or incompatible checkpoint)."""


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


def save(checkpoint: Checkpoint, run_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint`` atomically: a crash at any moment leaves either the previous
    checkpoint or the new one, both whole. Empty replay buffers are not saved."""
    remove_leftovers(run_dir)
    selected = [
        name
        for name, value in checkpoint.components.items()
        if not (isinstance(value, ReplayBuffer) and len(value) == 0)
    ]
    partial = checkpoint.save(run_dir / PARTIAL_NAME, components=selected, metadata=metadata)
    fsync_path(partial)
    destination = run_dir / CHECKPOINT_NAME
    os.replace(partial, destination)
    fsync_path(run_dir)
    return destination


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
    except (CheckpointError, RuntimeError, KeyError, ValueError, OSError, EOFError) as error:
        raise ResumeError(
            f"Checkpoint {path} is corrupt or does not match this configuration ({type(error).__name__}: "
            f"{_shorten(str(error))}). It was left untouched; start a new run or restore a good copy."
        ) from error


def _shorten(text: str, limit: int = 300) -> str:
    """First ``limit`` characters of an error text (state-dict errors print whole tensors)."""
    return text if len(text) <= limit else text[:limit] + " ..."
