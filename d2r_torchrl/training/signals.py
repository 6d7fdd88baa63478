"""Stopping a run with SIGINT (Ctrl-C) or SIGTERM: the trainer finishes the current update,
saves a checkpoint and returns; the recipe exits with ``128 + signal number`` (130, 143)."""
from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals(handler: Callable[[int, object], None]) -> Iterator[Callable[[], None]]:
    """Within the block SIGINT and SIGTERM are ignored until the yielded function is called,
    then passed to ``handler(signum, frame)``; the previous handlers come back at exit.
    Processes started while they are ignored (collector workers) keep ignoring them, so
    Ctrl-C reaches only the main process, which stops them in order."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}

    def catch() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    try:
        yield catch
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_code(signum: int) -> int:
    """Shell convention for a process stopped by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
