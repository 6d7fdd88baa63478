"""Long runs that survive: exact resume for every buffer, signals, crash-safe checkpoints,
errors before any work, checkpoints that move between devices."""
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tqdm
from torchrl.checkpoint import Checkpoint

import d2r_torchrl
from d2r_torchrl.data.replay import prepare_transitions, transition_bytes
from d2r_torchrl.training import builders, preflight
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME, ResumeError, read_metadata
from d2r_torchrl.training.cli import main
from d2r_torchrl.training.config import ConfigError, apply_overrides, preset
from d2r_torchrl.training.trainer import MultiTaskTrainer

ROOT = Path(__file__).resolve().parents[1]
# 3 rounds of 10 steps per task (episodes of 10 steps end at every round boundary), 1 warm-up
# round, 2 updates per round; small networks; a 50-slot buffer that wraps around.
SMALL = [
    "env.benchmark=reach-v3,push-v3",
    "env.max_episode_steps=10",
    "env.goals=fixed",  # exact resume needs goals that do not depend on the resets done
    "collector.steps_per_task=10",
    "collector.warmup_rounds=1",
    "collector.updates_per_round=2",
    "collector.total_steps_per_task=30",
    "network.num_modules=4",
    "network.module_width=16",
    "buffer.batch_size_per_task=4",
    "buffer.capacity=50",
    "eval.episodes_per_task=0",
    "log.progress_bar=false",
    "device=cpu",
]
STORAGES = {"memory": "buffer.memmap_above=1000", "memmap": "buffer.memmap_above=10"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one torch thread avoids oversubscribing a small shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_args(root: Path, name: str, *extra: str) -> list[str]:
    return [*SMALL, f"log.root={root}", f"log.name={name}", *extra]


def small_config(root: Path, name: str, *extra: str):
    return apply_overrides(preset("d2r", "MT10"), small_args(root, name, *extra))


def signal_after_batches(trainer: MultiTaskTrainer, batches: int, signum=signal.SIGINT) -> None:
    """Deliver a real ``signum`` to this process once ``batches`` batches are stored."""
    extend, stored = trainer.buffer.extend, []

    def extend_then_signal(data):
        out = extend(data)
        stored.append(len(data))
        if len(stored) == batches:
            signal.raise_signal(signum)
        return out

    trainer.buffer.extend = extend_then_signal


def signal_after_updates(trainer: MultiTaskTrainer, updates: int, signum=signal.SIGINT) -> None:
    """Deliver a real ``signum`` to this process during update number ``updates``."""
    update = trainer.update

    def update_then_signal():
        out = update()
        if trainer.counters.updates == updates:
            signal.raise_signal(signum)
        return out

    trainer.update = update_then_signal


def sample_with_seed(trainer: MultiTaskTrainer, seed: int = 123):
    """One batch drawn with fixed torch and NumPy RNGs (the prioritized sampler uses NumPy)."""
    with torch.random.fork_rng(devices=[]):
        numpy_state = np.random.get_state()
        torch.manual_seed(seed)
        np.random.seed(seed)
        batch = trainer.buffer.sample()
        np.random.set_state(numpy_state)
    return batch


def assert_same_run_state(expected: MultiTaskTrainer, actual: MultiTaskTrainer) -> None:
    assert actual.counters.state_dict() == expected.counters.state_dict()
    for key, value in expected.loss.state_dict().items():  # parameters, targets, log-alphas
        assert torch.equal(actual.loss.state_dict()[key], value), key
    for name, optimizer in expected.optimizers.items():
        torch.testing.assert_close(actual.optimizers[name].state_dict(), optimizer.state_dict(), rtol=0, atol=0)
    assert len(actual.buffer) == len(expected.buffer)
    assert actual.buffer.writer.state_dict() == expected.buffer.writer.state_dict()
    stored, expected_stored = actual.buffer[:], expected.buffer[:]
    for key in expected_stored.keys(True, True):
        assert torch.equal(stored[key], expected_stored[key]), key
    sample, expected_sample = sample_with_seed(actual), sample_with_seed(expected)
    for key in ("index", "priority_weight"):
        if key in expected_sample.keys():
            assert torch.equal(sample[key], expected_sample[key]), key


def _other(storage: str) -> str:
    return "memmap" if storage == "memory" else "memory"


@pytest.mark.parametrize(
    "kind,storage",
    [
        ("prioritized", "memmap"),
        ("stratified", "memory"),
        ("stratified_prioritized", "memmap"),
        pytest.param("stratified_prioritized", "memory", marks=pytest.mark.slow),
        pytest.param("prioritized", "memory", marks=pytest.mark.slow),
        pytest.param("stratified", "memmap", marks=pytest.mark.slow),
        pytest.param("uniform", "memory", marks=pytest.mark.slow),
        pytest.param("uniform", "memmap", marks=pytest.mark.slow),
    ],
)
def test_run_interrupted_in_warmup_and_mid_round_ends_like_uninterrupted(tmp_path, kind, storage):
    """The uninterrupted reference keeps its buffer in the other storage: both must agree."""
    straight = MultiTaskTrainer(small_config(tmp_path, "straight", f"buffer.kind={kind}", STORAGES[_other(storage)]))
    straight.train()
    assert straight.counters.updates == 4 and len(straight.buffer) == 50  # wrapped around

    extra = (f"buffer.kind={kind}", STORAGES[storage])
    stopped = MultiTaskTrainer(small_config(tmp_path, "stopped", *extra))
    signal_after_batches(stopped, 1)  # during warm-up: no update has run
    stopped.train()
    assert stopped.interrupted and (stopped.counters.frames, stopped.counters.updates) == (20, 0)
    stopped = MultiTaskTrainer.resume(tmp_path / "stopped")
    assert len(stopped.buffer) == 20
    signal_after_updates(stopped, 3)  # the first of round 3's two updates
    stopped.train()
    assert stopped.interrupted and stopped.counters.pending_updates == 1
    stopped = MultiTaskTrainer.resume(tmp_path / "stopped")
    stopped.train()
    assert not stopped.interrupted
    assert_same_run_state(straight, stopped)
    if storage == "memmap":
        _assert_buffer_files_reused(stopped)


def _assert_buffer_files_reused(trainer: MultiTaskTrainer) -> None:
    """The checkpoint holds no copy of the memory-mapped data, and the files on disk are as
    large as the size estimate that the disk check uses says."""
    manifest = Checkpoint.manifest(trainer.run_dir / CHECKPOINT_NAME)
    files = manifest["components"]["replay_buffer"]["files"]
    assert [f for f in files if f.startswith("storage/")] == ["storage/memmap_storage.json"], files
    on_disk = sum(f.stat().st_size for f in (trainer.run_dir / "buffer").rglob("*.memmap"))
    env = builders.env_factory(trainer.config, trainer.tasks)()
    example = prepare_transitions(env.fake_tensordict(), trainer.num_route_logits)
    per_transition = transition_bytes(trainer.config.buffer.kind, example, trainer.num_tasks)
    assert on_disk == trainer.buffer.storage.max_size * per_transition


def test_resume_without_saved_buffer_refills_it_and_says_so(tmp_path, capsys):
    trainer = MultiTaskTrainer(
        small_config(tmp_path, "run", "buffer.kind=uniform", "buffer.in_checkpoint=false", "collector.total_steps_per_task=40")
    )
    signal_after_updates(trainer, 1)
    trainer.train()
    assert trainer.counters.pending_updates == 1
    resumed = MultiTaskTrainer.resume(tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if "without a replay buffer" in line]
    assert len(lines) == 1 and "1 round(s) refill it" in lines[0]
    assert len(resumed.buffer) == 0 and resumed.counters.pending_updates == 0
    resumed.train()
    # rounds 3 and 4 are collected; round 3 refills (warm-up), round 4 updates twice
    assert (resumed.counters.frames, resumed.counters.updates) == (80, 3)


def test_a_finished_run_trains_on_to_a_larger_budget_like_a_longer_run(tmp_path):
    longer = MultiTaskTrainer(small_config(tmp_path, "longer", "buffer.kind=stratified", "collector.total_steps_per_task=50"))
    longer.train()
    MultiTaskTrainer(small_config(tmp_path, "extended", "buffer.kind=stratified")).train()  # 30 steps per task
    with pytest.raises(ConfigError, match="only collector.total_steps_per_task, device"):
        MultiTaskTrainer.resume(tmp_path / "extended", ["loss.gamma=0.5"])
    extended = MultiTaskTrainer.resume(tmp_path / "extended", ["collector.total_steps_per_task=50"])
    extended.train()
    assert_same_run_state(longer, extended)
    # the new budget is the run's own now: a plain resume finds it finished
    again = MultiTaskTrainer.resume(tmp_path / "extended")
    assert again.config.collector.total_steps_per_task == 50
    again.train()
    assert again.counters.state_dict() == longer.counters.state_dict()


def _poll(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def _start_recipe(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "recipes/d2r_mt10.py", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _interrupted_line(out: str, signum: int, run_dir: Path) -> list[str]:
    """Check the one line an interrupted run prints; return its resume command."""
    lines = [line for line in out.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "finished" not in out
    assert f"interrupted by {signal.Signals(signum).name}" in lines[0]
    assert f"checkpoint saved to {run_dir / CHECKPOINT_NAME}" in lines[0]
    saved = read_metadata(run_dir)
    assert f"after {saved['step']} frames" in lines[0] and saved["step"] >= 40  # after an update round
    command = shlex.split(lines[0].split("continue with: ")[1])
    assert command[2:] == ["--resume", str(run_dir)]
    return command


def test_ctrl_c_saves_prints_the_resume_command_and_exits_130(tmp_path):
    """SIGINT sent to a recipe process after its first update round."""
    process = _start_recipe(small_args(tmp_path, "run", "collector.total_steps_per_task=1000"))
    _poll((tmp_path / "run" / "scalars" / "train" / "loss_actor.csv").exists, 300, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    command = _interrupted_line(out, signal.SIGINT, tmp_path / "run")
    assert command[:2] == ["python", "recipes/d2r_mt10.py"]


def test_sigterm_exits_143_and_the_printed_command_finishes_the_run(tmp_path, capsys, monkeypatch):
    update = MultiTaskTrainer.update

    def update_then_sigterm(self):
        out = update(self)
        if self.counters.updates == 1:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(MultiTaskTrainer, "update", update_then_sigterm)
    assert main("d2r", "MT10", small_args(tmp_path, "run")) == 143
    command = _interrupted_line(capsys.readouterr().out, signal.SIGTERM, tmp_path / "run")
    assert main("d2r", "MT10", command[2:]) == 0
    assert f"finished after 60 frames, 4 updates; results in {tmp_path / 'run'}" in capsys.readouterr().out


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, capsys):
    """kill -9 while the second checkpoint is written (an in-memory buffer saved in each
    checkpoint makes a save take a while); the first one must load and the run go on."""
    run_dir, checkpoint = tmp_path / "run", tmp_path / "run" / CHECKPOINT_NAME
    process = _start_recipe(
        small_args(
            tmp_path, "run", "log.checkpoint_interval_rounds=1", "collector.total_steps_per_task=30",
            "buffer.capacity=50000", "buffer.memmap_above=1000000",
        )
    )

    def saving() -> list[Path]:  # files of a save in progress
        return [p for p in run_dir.glob(".*") if p.name.startswith((".checkpoint", "..checkpoint"))]

    _poll(checkpoint.exists, 300, process)
    _poll(saving, 300, process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL and saving()
    assert read_metadata(run_dir)["step"] == 20  # the first checkpoint, after round 1
    assert main("d2r", "MT10", ["--resume", str(run_dir)]) == 0
    assert "finished after 60 frames" in capsys.readouterr().out and not saving()


def test_checkpoint_from_another_configuration_or_version_is_refused(tmp_path, capsys, monkeypatch):
    MultiTaskTrainer(small_config(tmp_path, "run")).save()
    config_path = tmp_path / "run" / "config.json"
    original = config_path.read_text()
    edited = json.loads(original)
    edited["loss"]["gamma"] = 0.5
    edited["network"]["num_modules"] = 8
    config_path.write_text(json.dumps(edited))
    assert main("d2r", "MT10", ["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "loss.gamma: 0.99 -> 0.5" in err[0] and "network.num_modules: 4 -> 8" in err[0]
    assert "buffer" not in err[0]  # only what differs
    config_path.write_text(original)
    with pytest.raises(ConfigError, match="only collector.total_steps_per_task, device, log.progress_bar, compile.enabled"):
        MultiTaskTrainer.resume(tmp_path / "run", ["loss.gamma=0.5"])
    written_by = d2r_torchrl.__version__
    monkeypatch.setattr(d2r_torchrl, "__version__", "9.9.9")
    with pytest.raises(ResumeError, match=re.escape(f"written by d2r-torchrl {written_by}, this is 9.9.9")):
        MultiTaskTrainer.resume(tmp_path / "run")


def test_clear_errors_before_any_work(tmp_path, capsys, monkeypatch):
    def error_line(args) -> str:
        assert main("d2r", "MT10", args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in error_line(small_args(tmp_path, "cuda", "device=cuda"))
    assert not (tmp_path / "cuda").exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "Cannot write to the run directory" in error_line(small_args(blocker, "run"))

    free = 10 * 2**20
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free})())
    message = error_line(small_args(tmp_path, "big", STORAGES["memmap"], "buffer.capacity=100000"))
    assert "Not enough disk space" in message and "memory-mapped replay buffer of 100,000 transitions" in message
    needed = float(re.search(r"needs ([0-9.]+) GiB", message).group(1))
    per_transition = int(re.search(r"\((\d+) bytes per transition\)", message).group(1))
    assert needed == pytest.approx(100_000 * per_transition / 2**30, abs=0.01)
    assert not list((tmp_path / "big").glob("buffer/*"))


def _as_if_written_on_cuda(archive: Path) -> None:
    """Rewrite a CPU checkpoint the way a CUDA run writes it: every tensor recorded on
    ``cuda:0`` (the optimiser's, the loss's) and a CUDA RNG state next to the CPU one."""
    rewritten = archive.with_suffix(".cuda")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(rewritten, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("state.json"):
                data = data.replace(b'"device":"cpu"', b'"device":"cuda:0"')
                if "-rng/" in item.filename:
                    schema = json.loads(data)
                    cpu = next(value for key, value in schema["items"] if key["value"] == "torch_cpu")
                    schema["items"].append([{"kind": "value", "value": "torch_cuda"}, {"kind": "list", "items": [cpu]}])
                    data = json.dumps(schema).encode()
            target.writestr(item, data)
    os.replace(rewritten, archive)


def test_cuda_checkpoint_resumes_on_cpu(tmp_path, monkeypatch):
    trainer = MultiTaskTrainer(small_config(tmp_path, "run"))
    signal_after_updates(trainer, 1)
    trainer.train()
    archive = tmp_path / "run" / CHECKPOINT_NAME
    _as_if_written_on_cuda(archive)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["device"] = "cuda"  # started with device=cuda on a GPU machine
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError):  # what a CPU machine meets without map_location
        Checkpoint(format="archive", loss=trainer.loss).load(archive)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        MultiTaskTrainer.resume(tmp_path / "run")
    resumed = MultiTaskTrainer.resume(tmp_path / "run", ["device=cpu"])
    assert resumed.device.type == "cpu" and resumed.counters.updates == 1
    for key, value in trainer.loss.state_dict().items():
        assert torch.equal(resumed.loss.state_dict()[key], value), key
    resumed.train()
    assert resumed.counters.frames == 60 and not resumed.interrupted


# The recipe with every evaluation step slowed down (0.2 s), so a signal lands mid-evaluation.
SLOW_EVALUATION_RECIPE = """
import sys, time
from d2r_torchrl.training import evaluation
from d2r_torchrl.training.cli import main
eval_action = evaluation.MetaWorldAgent.eval_action
def slow_eval_action(self, observations):
    time.sleep(0.2)
    return eval_action(self, observations)
evaluation.MetaWorldAgent.eval_action = slow_eval_action
sys.exit(main("d2r", "MT10", sys.argv[1:]))
"""


def test_sigterm_during_an_evaluation_exits_143_within_seconds_and_the_resumed_run_evaluates_first(tmp_path, capsys):
    """The evaluation of round 2 (20 episodes of 10 steps per task, at least 40 s here) is
    cut at its next step: exit 143 within seconds, a checkpoint after round 2's updates, no
    evaluation row; the resumed run evaluates round 2 first, once, at the same step."""
    run_dir = tmp_path / "run"
    args = small_args(tmp_path, "run", "eval.episodes_per_task=20", "eval.interval_rounds=2")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_EVALUATION_RECIPE, *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _poll((run_dir / "scalars" / "train" / "loss_actor.csv").exists, 300, process)  # round 2's updates are done
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running 30 s after SIGTERM: {process.communicate()}")
    assert process.returncode == 143 and time.monotonic() - sent < 10, err[-2000:]
    _interrupted_line(out, signal.SIGTERM, run_dir)
    assert "the evaluation it cut short runs again on resume" in out
    assert read_metadata(run_dir)["step"] == 40 and not (run_dir / "scalars" / "eval").exists()

    assert main("d2r", "MT10", ["--resume", str(run_dir)]) == 0
    assert "finished after 60 frames, 4 updates" in capsys.readouterr().out
    rows = (run_dir / "scalars" / "eval" / "success_mean.csv").read_text().split()
    assert [row.split(",")[0] for row in rows] == ["40"]  # round 2's evaluation, once


def test_a_stop_during_collection_drops_the_batch_and_the_resumed_run_ends_like_uninterrupted(tmp_path):
    """SIGTERM at the 5th of the 10 steps collecting round 3: the actor is not called again,
    the checkpoint is the state after round 2 (RNGs included), and resuming ends where the
    uninterrupted run does."""
    straight = MultiTaskTrainer(small_config(tmp_path, "straight", "buffer.kind=stratified"))
    straight.train()
    stopped = MultiTaskTrainer(small_config(tmp_path, "stopped", "buffer.kind=stratified"))
    steps = []

    def signal_mid_collection(_, args) -> None:
        if stopped.counters.frames == 40 and args[0].numel() == stopped.num_tasks:  # round 3's steps
            steps.append(args[0])
            if len(steps) == 5:
                signal.raise_signal(signal.SIGTERM)

    stopped.actor.register_forward_pre_hook(signal_mid_collection)
    stopped.train()
    assert stopped.interrupted and len(steps) == 5
    assert stopped.counters.state_dict() == dict(
        rounds=2, frames=40, updates=2, pending_updates=0, batch_start_frames=20, pending_evaluation=0
    )
    assert read_metadata(tmp_path / "stopped")["step"] == 40
    resumed = MultiTaskTrainer.resume(tmp_path / "stopped")
    resumed.train()
    assert not resumed.interrupted
    assert_same_run_state(straight, resumed)


def test_the_progress_bar_moves_with_each_collected_step_and_each_update(tmp_path, capsys, monkeypatch):
    """Every bar refresh is printed (mininterval=0): the frame count passes through each step
    of 2 frames (2 tasks), and each update round shows its updates done, owed and rate."""
    monkeypatch.setattr(tqdm, "tqdm", functools.partial(tqdm.tqdm, mininterval=0))
    MultiTaskTrainer(small_config(tmp_path, "run", "log.progress_bar=true")).train()
    err = capsys.readouterr().err
    shown = {int(frames) for frames in re.findall(r"\| *(\d+)/60 \[", err)}
    assert shown == set(range(0, 61, 2))
    shown_updates = re.findall(r"updates (\d)/2 \(([0-9.]+|-)/s\)", err)
    assert [done for done, _ in shown_updates] == ["0", "1", "2"] * 2  # rounds 2 and 3
    assert all((rate == "-") == (done == "0") for done, rate in shown_updates)
