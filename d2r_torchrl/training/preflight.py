"""Checks run before any work (with :func:`builders.resolve_device`, which checks the device):
the run directory can be written and the disk can hold the replay buffer. Each raises
:class:`ConfigError` saying what to change."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from d2r_torchrl.training.config import ConfigError

GIB = 2**30


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and write a probe file in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise ConfigError(
            f"Cannot write to the run directory {run_dir} ({error.strerror or error}); choose another "
            "log.root or log.name."
        ) from None


def allocated_bytes(directory: Path) -> int:
    """Disk blocks already taken by the files under ``directory`` (sparse files count what
    was written, not their length)."""
    if not directory.exists():
        return 0
    return sum(file.stat().st_blocks * 512 for file in directory.rglob("*") if file.is_file())


def check_disk_for_buffer(
    run_dir: Path, capacity: int, bytes_per_transition: int, memory_mapped: bool, in_checkpoint: bool
) -> None:
    """The disk under ``run_dir`` must hold the replay buffer's ``capacity`` transitions: as
    memory-mapped files (minus what those files already take when resuming), or, for an
    in-memory buffer saved in checkpoints, twice (the staged copy and the archive of a save)."""
    full = capacity * bytes_per_transition
    if memory_mapped:
        needed = full - allocated_bytes(run_dir / "buffer")
        what = f"a memory-mapped replay buffer of {capacity:,} transitions"
    elif in_checkpoint:
        needed = 2 * full
        what = f"saving the in-memory replay buffer of {capacity:,} transitions in checkpoints"
    else:
        return
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        raise ConfigError(
            f"Not enough disk space under {run_dir}: {what} needs {needed / GIB:.2f} GiB "
            f"({bytes_per_transition} bytes per transition), {free / GIB:.2f} GiB are free. Lower "
            "buffer.capacity, set log.root on a larger disk"
            + (", or set buffer.in_checkpoint=false to refill the buffer after resuming." if not memory_mapped else ".")
        )
