"""Checkpoints through ``torchrl.checkpoint.Checkpoint``, with clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torchrl.checkpoint import Checkpoint, CheckpointError, GlobalRNGState

CHECKPOINT_NAME = "checkpoint"


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (missing, corrupt or incompatible checkpoint)."""


class Counters:
    """Training progress saved with every checkpoint."""

    def __init__(self) -> None:
        self.rounds = 0
        self.frames = 0
        self.updates = 0

    def state_dict(self) -> dict[str, int]:
        return {"rounds": self.rounds, "frames": self.frames, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds, self.frames, self.updates = int(state["rounds"]), int(state["frames"]), int(state["updates"])


def make_checkpoint(components: dict[str, Any], with_buffer: bool) -> Checkpoint:
    """Register the run's components; the replay buffer only when ``with_buffer``."""
    selected = {name: value for name, value in components.items() if with_buffer or name != "replay_buffer"}
    return Checkpoint(format="archive", rng=GlobalRNGState(), **selected)


def save(checkpoint: Checkpoint, run_dir: Path, metadata: dict[str, Any]) -> Path:
    """Atomic save to ``run_dir/checkpoint`` (the previous one stays until the new one is whole)."""
    return checkpoint.save(run_dir / CHECKPOINT_NAME, metadata=metadata)


def load(checkpoint: Checkpoint, run_dir: Path, map_location: Any = None) -> None:
    """Restore every registered component from ``run_dir``; raises :class:`ResumeError`."""
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        raise ResumeError(f"No checkpoint at {path}: nothing to resume in {run_dir}.")
    try:
        checkpoint.load(path, map_location=map_location)
    except (CheckpointError, RuntimeError, KeyError, ValueError, OSError, EOFError) as error:
        raise ResumeError(
            f"Checkpoint {path} is corrupt or does not match this configuration ({type(error).__name__}: "
            f"{error}). It was left untouched; start a new run or restore a good copy."
        ) from error
