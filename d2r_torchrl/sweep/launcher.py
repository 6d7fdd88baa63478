"""Run a sweep's training runs as Ray tasks on the connected cluster.

Each unfinished run becomes one Ray task with declared resources (:func:`run_resources`)
running the ordinary :class:`MultiTaskTrainer` in its run directory: a new run starts, an
interrupted one (its checkpoint exists) continues through :meth:`MultiTaskTrainer.resume`, a
finished one (``sweep.json`` says ``done``) is skipped. A run that fails (an exception,
a killed worker) is reported with its error and the others go on.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from d2r_torchrl.envs.metaworld import resolve_tasks
from d2r_torchrl.sweep.plan import SweepRun, config_mismatch, read_record, write_record
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME
from d2r_torchrl.training.config import ConfigError, RunConfig, resume_overrides
from d2r_torchrl.training.ray_collector import require_ray
from d2r_torchrl.training.run_lock import RunInUseError, RunLock


@dataclass
class RunResult:
    """Outcome of one run in this sweep invocation: ``status`` is ``done``, ``skipped``
    (finished before), ``interrupted`` (stopped by a signal, checkpoint saved) or ``failed``."""

    run: SweepRun
    status: str
    error: str = ""
    record: dict[str, Any] = field(default_factory=dict)


def train_run(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Train one run to its frame budget, resuming its checkpoint if there is one.

    Runs inside a Ray task. ``sweep.json`` records the worker (``pid``, ``host``) while it
    runs, then the status, the frames and updates reached, the frames each resume started
    from, and the wall seconds summed over segments. Returns that record.
    """
    from d2r_torchrl.training.trainer import MultiTaskTrainer

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with RunLock(path):  # the trainer shares this process's lock; sweep.json is written under it
        record = read_record(path)
        write_record(path, {**record, "status": "running", "pid": os.getpid(), "host": socket.gethostname()})
        started = time.perf_counter()
        if (path / CHECKPOINT_NAME).exists():  # the plan's budget, device and compile settings apply
            trainer = MultiTaskTrainer.resume(path, resume_overrides(RunConfig.from_dict(config)))
            record["resumed_from_frames"] = [*record.get("resumed_from_frames", []), trainer.counters.frames]
        else:
            trainer = MultiTaskTrainer(RunConfig.from_dict(config), path)
        trainer.train()
        record.update(
            status="interrupted" if trainer.interrupted else "done",
            error="",
            seconds=record.get("seconds", 0.0) + time.perf_counter() - started,
            **trainer.counters.state_dict(),
        )
        write_record(path, record)
    return record


def run_resources(config: RunConfig, cluster_gpus: float, cpus: float | None = None, gpus: float | None = None) -> dict[str, float]:
    """Ray resources of one run: ``cpus`` (default: the collector's worker processes for
    ``multi_*`` collectors, else 1; Ray collector actors reserve their own) and ``gpus``
    (default: 1 when ``device`` is ``cuda``, or ``auto`` on a cluster with GPUs, else 0)."""
    if cpus is None:
        cpus = config.collector.num_workers if config.collector.kind.startswith("multi") else 1
    if gpus is None:
        device = config.device.split(":")[0]
        gpus = 1 if device == "cuda" or (device == "auto" and cluster_gpus > 0) else 0
    if gpus > cluster_gpus:
        raise ConfigError(
            f"Each run asks for {gpus:g} GPU (device={config.device}) but the Ray cluster has {cluster_gpus:g}; "
            "use device=cpu or a cluster with GPUs."
        )
    return {"num_cpus": cpus, "num_gpus": gpus}


def _prepare(run: SweepRun) -> RunResult | None:
    """A result when the run needs no task (finished with the planned frame budget, or its
    folder holds another configuration); clears the folder of a run that died before its
    first checkpoint. A finished run whose planned budget grew is continued."""
    record = read_record(run.run_dir)
    mismatch = config_mismatch(run)
    if mismatch:
        return RunResult(
            run, "failed", f"{run.run_dir} holds a run with other values of {', '.join(mismatch)}; "
            "use another --out or the command that started it.", record,
        )
    planned_frames = run.config.collector.total_steps_per_task * len(resolve_tasks(run.config.env.benchmark))
    if record["status"] == "done" and record.get("frames", 0) >= planned_frames:
        return RunResult(run, "skipped", record=record)
    if run.run_dir.exists() and not (run.run_dir / CHECKPOINT_NAME).exists():
        try:
            with RunLock(run.run_dir):  # not under a run another process is training
                shutil.rmtree(run.run_dir)
        except RunInUseError as error:
            return RunResult(run, "failed", str(error), record)
    return None


def _error_text(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".strip()


def _report(result: RunResult, on_result: Callable[[RunResult], None] | None) -> RunResult:
    if on_result is not None:
        on_result(result)
    return result


def run_sweep(
    runs: Sequence[SweepRun],
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run every unfinished run on the connected Ray cluster (``ray.init`` done by the
    caller), at most as many at once as the cluster's resources allow. Returns one
    :class:`RunResult` per run, in ``runs`` order; ``on_result`` sees each as it comes.
    Ctrl-C cancels the tasks: each run saves its checkpoint and ends ``interrupted``."""
    require_ray()
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    results: dict[str, RunResult] = {}
    pending = {}
    for run in runs:
        result = _prepare(run)
        if result is None:
            options = run_resources(run.config, cluster_gpus, cpus_per_run, gpus_per_run)
            task = ray.remote(train_run).options(name=run.name, max_retries=0, **options)
            pending[task.remote(str(run.run_dir), run.config.to_dict())] = run
        else:
            results[run.name] = _report(result, on_result)
    try:
        _collect(pending, results, on_result)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # SIGINT in the worker: the MultiTaskTrainer saves and returns
        _collect(pending, results, on_result)
    return [results[run.name] for run in runs]


def _collect(pending: dict, results: dict[str, RunResult], on_result: Callable[[RunResult], None] | None) -> None:
    """Wait for the pending tasks one by one; a task's error becomes a ``failed`` result."""
    import ray

    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready)
        try:
            record = ray.get(ready)
            result = RunResult(run, record["status"], record=record)
        except ray.exceptions.TaskCancelledError:
            result = RunResult(run, "interrupted", "cancelled before it started", read_record(run.run_dir))
        except ray.exceptions.RayError as error:
            record = {**read_record(run.run_dir), "status": "failed", "error": _error_text(error)}
            write_record(run.run_dir, record)
            result = RunResult(run, "failed", record["error"], record)
        results[run.name] = _report(result, on_result)
