"""One process per run directory: an exclusive ``flock`` on ``run_dir/.lock``.

The kernel releases the lock whenever the holding process ends, however it ends (``kill -9``
included), so a lock left by a crashed run is free again: no stale-lock guessing. The file
records the holder (``pid``, ``host``, ``since``) so that a refused process can name it. The
holders inside one process share the lock (several trainers of one run in one process, e.g.
a run and its resumption in a script); other processes are refused.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunInUseError(RuntimeError):
    """The run directory is locked by another process."""


# This process's locks: real path of the lock file -> [file descriptor, holders].
_held: dict[str, list[int]] = {}


class RunLock:
    """The lock of ``run_dir`` for one holder; :meth:`acquire` and :meth:`release` are
    idempotent. Raises :class:`RunInUseError` (one line naming the holder) when another
    process has it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> None:
        if self._key is not None:
            return
        key = os.path.realpath(self.path)
        if key in _held:
            _held[key][1] += 1
            self._key = key
            return
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise RunInUseError(
                f"{self.run_dir} is in use by another process ({holder}); wait for it to end, stop it, "
                "or choose another log.name."
            ) from None
        except BaseException:
            os.close(descriptor)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        _held[key] = [descriptor, 1]
        self._key = key

    def release(self) -> None:
        """Give the lock up (the file stays; the next holder overwrites its record)."""
        if self._key is None:
            return
        entry = _held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])
        self._key = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_holder(descriptor: int) -> str:
    """``"pid P on HOST since TIME"`` from the lock file, or what is known."""
    try:
        record = json.loads(os.pread(descriptor, 4096, 0).decode() or "{}")
        return f"pid {record['pid']} on {record['host']} since {record['since']}"
    except (ValueError, KeyError, OSError):
        return "holder not recorded yet"
