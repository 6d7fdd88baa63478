"""The run's progress bar (tqdm over frames) that moves in every phase of a round: with each
collected step, with the updates as they run, and says when it evaluates."""
from __future__ import annotations

import time

import tqdm


class RunProgress:
    """tqdm bar over the run's frames.

    - :meth:`collected`: frames stepped in the batch being collected (the bar moves during
      collection, not only when the batch is stored);
    - :meth:`updates_started`, :meth:`updated`: the updates of a round as they run,
      ``updates 37/200 (12.5/s)`` (done, owed, updates per second), shown at the first and
      last update and at most every ``refresh_seconds`` between;
    - :meth:`evaluating`: an evaluation has started;
    - :meth:`batch_done`: the frames stored so far, with the last success rate and the
      seconds each phase took.
    """

    def __init__(self, total: int, initial: int, *, enabled: bool, refresh_seconds: float = 0.5) -> None:
        self.bar = tqdm.tqdm(total=total, initial=initial, unit="frame", disable=not enabled)
        self.refresh_seconds = refresh_seconds
        self._owed = 0
        self._updates_started = self._shown_at = 0.0

    def collected(self, frames: int) -> None:
        self.bar.update(frames)

    def updates_started(self, owed: int) -> None:
        """A round's ``owed`` updates start."""
        self._owed, self._updates_started = owed, time.monotonic()
        self._show_updates(0, self._updates_started)

    def updated(self, done: int) -> None:
        """``done`` of the round's updates have run."""
        now = time.monotonic()
        if done == 1 or done >= self._owed or now - self._shown_at >= self.refresh_seconds:
            self._show_updates(done, now)

    def _show_updates(self, done: int, now: float) -> None:
        elapsed = now - self._updates_started
        rate = f"{done / elapsed:.1f}/s" if done and elapsed > 0 else "-/s"
        self._shown_at = now
        self.bar.set_postfix_str(f"updates {done}/{self._owed} ({rate})")

    def evaluating(self, episodes_per_task: int) -> None:
        self.bar.set_postfix_str(f"evaluating ({episodes_per_task} episodes per task)")

    def batch_done(self, frames: int, postfix: dict[str, object]) -> None:
        """The buffer holds the batch: the bar shows ``frames`` and ``postfix``."""
        self.bar.n = frames
        self.bar.set_postfix(postfix)  # shows both

    def close(self) -> None:
        self.bar.close()
