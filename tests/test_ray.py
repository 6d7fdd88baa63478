"""On a real local Ray cluster (this machine, 2 CPUs): a 2-method x 2-seed sweep with one run
killed mid-run, the same command resuming it, the aggregation of those runs, and
training with the Ray collector."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("rliable")

from test_training import TINY, TWO_TASKS, tiny_config  # noqa: E402

from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402
from d2r_torchrl.modules.actor_critic import ROUTE_KEY  # noqa: E402
from d2r_torchrl.sweep import plan_sweep, read_record, run_sweep  # noqa: E402
from d2r_torchrl.training import builders  # noqa: E402
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME  # noqa: E402
from d2r_torchrl.training.trainer import MultiTaskTrainer  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_TASK = 60  # 6 rounds of 10 steps per task: a checkpoint every 2 rounds, an evaluation every 3
BENCHMARK = TWO_TASKS.split("=", 1)[1]  # a task list as the sweep's benchmark
SWEEP = [*TINY, f"collector.total_steps_per_task={STEPS_PER_TASK}", "log.checkpoint_interval_rounds=2"]
METHODS, SEEDS = ["mt_sac", "mh_sac"], [0, 1]  # the cheapest updates: the sweep, not the network, is under test


@pytest.fixture(scope="module")
def cluster():
    """A local one-node cluster with 2 CPUs; yields its address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _kill_when_checkpointed(run_dir: Path, killed: dict, timeout: float = 240.0) -> None:
    """SIGKILL the worker training ``run_dir`` once it has saved its first checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_record(run_dir) if (run_dir / "sweep.json").exists() else {}
        if record.get("status") == "running" and (run_dir / CHECKPOINT_NAME).exists():
            os.kill(record["pid"], signal.SIGKILL)
            killed["pid"] = record["pid"]
            return
        time.sleep(0.005)


def test_sweep_survives_a_killed_run_and_the_same_command_resumes_it(cluster, tmp_path):
    runs = plan_sweep(tmp_path, METHODS, SEEDS, [BENCHMARK], SWEEP)
    target = runs[0]
    killed: dict = {}
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(target.run_dir, killed))
    watcher.start()
    first = {r.run.name: r for r in run_sweep(runs, cpus_per_run=0.5)}  # all four at once
    watcher.join()
    assert killed, "the watched run was never seen running with a checkpoint"
    assert first[target.name].status == "failed" and "Worker" in first[target.name].error
    assert read_record(target.run_dir)["status"] == "failed"  # the error is kept in its folder
    total = STEPS_PER_TASK * 2
    for run in runs[1:]:  # the others went on to the end
        assert first[run.name].status == "done" and first[run.name].record["frames"] == total

    # the same sweep as a command joining the cluster: skips 3 runs, resumes the killed one
    command = [sys.executable, "-m", "d2r_torchrl.sweep", "--address", cluster, "--out", str(tmp_path),
               "--methods", *METHODS, "--seeds", *map(str, SEEDS), "--benchmarks", BENCHMARK, "--reps", "300", *SWEEP]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = read_record(target.run_dir)
    assert record["status"] == "done" and record["frames"] == total
    [resumed_from] = record["resumed_from_frames"]
    assert 0 < resumed_from < total  # continued from the checkpoint, not from scratch
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.split(": ")[0] in first)
    assert [printed[run.name].split()[0] for run in runs] == ["done", "skipped", "skipped", "skipped"]
    table = (tmp_path / "runs.md").read_text()
    assert table.count("| done |") == 4

    # the report aggregates the four finished runs; check the final IQMs by hand
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"mt_sac_reach-v3+push-v3", "mh_sac_reach-v3+push-v3"}
    for group, result_ in summary.items():
        finals = [
            read_scalar_csv(tmp_path / f"{group}_seed{seed}" / "scalars" / "eval" / "return" / f"{task}.csv")[1][-1]
            for seed in SEEDS for task in ("reach-v3", "push-v3")
        ]
        middle = sorted(finals)[1:3]
        assert result_["return"]["iqm"][-1] == pytest.approx(np.mean(middle))
        assert result_["return"]["lower"][-1] <= result_["return"]["iqm"][-1] <= result_["return"]["upper"][-1]
        assert result_["return"]["frames"][-1] == total
    assert (tmp_path / "curves.png").stat().st_size > 0 and "mh_sac_reach-v3+push-v3 | 2 |" in (tmp_path / "summary.md").read_text()


def test_training_with_the_ray_collector(cluster, tmp_path, monkeypatch):
    trainer = MultiTaskTrainer(tiny_config(tmp_path, "collector.kind=ray", "buffer.kind=uniform", "eval.episodes_per_task=0"))
    initial = [p.detach().clone() for p in trainer.actor.parameters()]
    seen = {}
    make_collector = builders.make_collector

    def observed_collector(*args, **kwargs):
        """The trainer's collector, reporting its first batch and, at shutdown, the workers' weights."""
        collector = make_collector(*args, **kwargs)
        iterator, shutdown = collector.iterator, collector.shutdown

        def iterate():
            for batch in iterator():
                seen.setdefault("batch", batch.clone())
                yield batch

        def fetch_weights_then_shutdown(*a, **k):
            seen.setdefault("workers", collector.get_distant_attr("policy"))
            shutdown(*a, **k)

        collector.iterator, collector.shutdown = iterate, fetch_weights_then_shutdown
        return collector

    monkeypatch.setattr(builders, "make_collector", observed_collector)
    trainer.train()  # three rounds: warm-up, then two rounds of updates, weights pushed after each
    assert (trainer.counters.rounds, trainer.counters.frames, trainer.counters.updates) == (3, 60, 4)
    batch = seen["batch"]
    assert batch.shape == (2, 1, 10)  # [workers, tasks per worker, steps]
    assert batch["task_id"].reshape(2, -1).tolist() == [[0] * 10, [1] * 10]  # each worker's slice, global ids
    stored = trainer.buffer[:]
    assert torch.bincount(stored["task_id"]).tolist() == [30, 30]
    assert (stored[ROUTE_KEY].sum(-1) == 31).all()  # every transition carries its sampled k-hot route
    learner = [p.detach().cpu() for p in trainer.actor.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(learner, initial))  # the updates changed the policy
    assert len(seen["workers"]) == 2
    for worker_policy in seen["workers"]:  # ... and the workers received the last weights
        for got, want in zip(worker_policy.parameters(), learner):
            torch.testing.assert_close(got.detach(), want)
