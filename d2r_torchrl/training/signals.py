"""Stopping a run with SIGINT (Ctrl-C) or SIGTERM: the trainer finishes the current update,
or drops the collection or evaluation in progress at the policy's next step, saves a
checkpoint and returns; the recipe exits with ``128 + signal number`` (130, 143)."""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """Raised at the policy's next step of a collection or evaluation once a stop signal has
    arrived; the trainer catches it and drops that work. A ``BaseException``, as
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


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


@contextlib.contextmanager
def stop_at_next_call(
    module: torch.nn.Module, stop_signal: Callable[[], int | None], on_call: Callable[[tuple[Any, ...]], None] | None = None
) -> Iterator[None]:
    """Within the block every call of ``module`` first raises :class:`StopRequested` if
    ``stop_signal()`` names a signal, and otherwise passes its positional arguments to
    ``on_call``. A collection or an evaluation calls the policy once per env step, so a
    stop ends it within a step."""

    def check(_: torch.nn.Module, args: tuple[Any, ...]) -> None:
        signum = stop_signal()
        if signum is not None:
            raise StopRequested(signum)
        if on_call is not None:
            on_call(args)

    handle = module.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def exit_code(signum: int) -> int:
    """Shell convention for a process stopped by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
