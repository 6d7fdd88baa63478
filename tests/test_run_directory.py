"""One process per run directory, names that do not collide, nothing deleted that a run did
not create, and checkpoint failures that change nothing: damaged archives, full disks."""
import datetime
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torchrl.checkpoint import Checkpoint

from d2r_torchrl.training import preflight, trainer as trainer_module
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME, read_metadata
from d2r_torchrl.training.cli import main
from d2r_torchrl.training.config import ConfigError
from d2r_torchrl.training.run_lock import LOCK_NAME, RunInUseError, RunLock
from d2r_torchrl.training.trainer import BUFFER_MARKER, MultiTaskTrainer
from test_resume import ROOT, STORAGES, small_args, small_config

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
PYTORCH_CHAIN = "compile.native_chain=false"  # runs that train here need no native build


def error_line(capsys, args: list[str]) -> str:
    """The one ``error: ...`` line of a refused command (exit status 2)."""
    assert main("d2r", "MT10", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of every file under ``run_dir``."""
    return {
        str(path.relative_to(run_dir)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


def recipe(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "recipes/d2r_mt10.py", *args], cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=300
    )


def test_a_second_process_is_refused_while_a_run_holds_its_directory(tmp_path):
    holder = MultiTaskTrainer(small_config(tmp_path, "run", STORAGES["memmap"], PYTORCH_CHAIN))
    run_dir = tmp_path / "run"
    (run_dir / "buffer" / "files_of_the_first_run").write_text("in use")
    before = snapshot(run_dir)
    holder_text = f"pid {os.getpid()} on {socket.gethostname()} since "

    started = recipe(small_args(tmp_path, "run", STORAGES["memmap"], PYTORCH_CHAIN))  # a new run of the same name
    holder.save()
    after_save = snapshot(run_dir)
    resumed = recipe(["--resume", str(run_dir)])

    for process in (started, resumed):
        lines = process.stderr.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1, process.stderr[-2000:]
        assert lines[0].startswith(f"error: {run_dir} is in use by another process ({holder_text}")
    assert {key: value for key, value in after_save.items() if key in before} == before  # nothing touched
    assert snapshot(run_dir) == after_save
    holder.train()  # the holder goes on undisturbed
    assert holder.counters.frames == 60


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = (
        "import sys, time; from d2r_torchrl.training.run_lock import RunLock\n"
        f"RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(300)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"in use by another process \\(pid {process.pid} on "):
            RunLock(run_dir).acquire()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    trainer = MultiTaskTrainer(small_config(tmp_path, "run"))  # the kernel released the dead process's lock
    assert f'"pid": {os.getpid()}' in (run_dir / LOCK_NAME).read_text()
    trainer.close()


def test_default_run_names_launched_in_the_same_second_differ(tmp_path, monkeypatch):
    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 20, 12, 0, 0)

    monkeypatch.setattr(trainer_module.datetime, "datetime", FrozenClock)
    first, second = (MultiTaskTrainer(small_config(tmp_path, "")) for _ in range(2))
    assert first.run_dir == tmp_path / "d2r_reach-v3,push-v3_20261120-120000"
    assert second.run_dir == tmp_path / "d2r_reach-v3,push-v3_20261120-120000-2"
    assert (first.run_dir / "config.json").exists() and (second.run_dir / "config.json").exists()


def test_a_new_run_deletes_only_a_buffer_folder_an_earlier_run_created(tmp_path, capsys):
    own = tmp_path / "own"
    (own / "buffer").mkdir(parents=True)
    (own / "buffer" / "precious.txt").write_text("not the run's")
    message = error_line(capsys, small_args(tmp_path / "own", ".", STORAGES["memmap"]))  # log.name=.
    assert f"{own / '.' / 'buffer'} exists and was not written by a d2r-torchrl run" in message
    assert (own / "buffer" / "precious.txt").read_text() == "not the run's"

    earlier = MultiTaskTrainer(small_config(tmp_path, "run", STORAGES["memmap"]))  # stopped before any checkpoint
    earlier.close()
    assert (tmp_path / "run" / "buffer" / BUFFER_MARKER).exists()
    (tmp_path / "run" / "buffer" / "stale.memmap").write_text("left by the run")
    again = MultiTaskTrainer(small_config(tmp_path, "run", STORAGES["memmap"]))
    assert not (again.run_dir / "buffer" / "stale.memmap").exists()
    assert (again.run_dir / "buffer" / BUFFER_MARKER).exists()


def _damage_the_largest_member(archive: Path) -> None:
    with zipfile.ZipFile(archive) as file:
        member = max(file.infolist(), key=lambda info: info.compress_size)
    data = bytearray(archive.read_bytes())
    name_length, extra_length = (int.from_bytes(data[member.header_offset + at : member.header_offset + at + 2], "little") for at in (26, 28))
    middle = member.header_offset + 30 + name_length + extra_length + member.compress_size // 2
    data[middle : middle + 64] = bytes(64)  # zeros over the middle of its data
    archive.write_bytes(bytes(data))


def test_a_checkpoint_damaged_in_the_middle_is_refused_before_anything_changes(tmp_path, capsys):
    trainer = MultiTaskTrainer(small_config(tmp_path, "run"))
    trainer.save()
    trainer.close()
    run_dir = tmp_path / "run"
    _damage_the_largest_member(run_dir / CHECKPOINT_NAME)
    before = snapshot(run_dir)
    message = error_line(capsys, ["--resume", str(run_dir), "device=cpu"])
    assert f"Checkpoint {run_dir / CHECKPOINT_NAME} is damaged" in message and "nothing in" in message
    assert snapshot(run_dir) == before


def _parse_size(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+) (GiB|MiB)", text).groups()
    return float(number) * (2**30 if unit == "GiB" else 2**20)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_what_a_save_needs(tmp_path, capsys, monkeypatch):
    save, saves = Checkpoint.save, []

    def save_until_the_disk_is_full(self, path, **kwargs):
        saves.append(path)
        if len(saves) < 3:  # rounds 1 and 2 (Adam's moments exist after round 2's updates)
            return save(self, path, **kwargs)
        (Path(path).parent / f".{Path(path).name}.stage-x").mkdir()  # what a save had written so far
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpoint, "save", save_until_the_disk_is_full)
    run_dir = tmp_path / "run"
    message = error_line(capsys, small_args(tmp_path, "run", "log.checkpoint_interval_rounds=1", PYTORCH_CHAIN))
    assert message.startswith(f"error: Cannot write the checkpoint in {run_dir} (No space left on device): ")
    assert message.endswith(f"the previous checkpoint {run_dir / CHECKPOINT_NAME} is kept. Free some space "
                            "(or set log.root on a larger disk) and resume the run.")
    needed = _parse_size(re.search(r"a checkpoint save needs ([0-9.]+ [GM]iB)", message).group(1))
    archive = (run_dir / CHECKPOINT_NAME).stat().st_size
    assert 2 * archive <= needed <= 2 * 1.1 * archive  # staged copy and archive, buffer at capacity
    assert read_metadata(run_dir)["step"] == 40  # the save of round 2
    assert not [path.name for path in run_dir.glob(".*") if path.name != LOCK_NAME]  # no leftovers
    monkeypatch.undo()
    assert main("d2r", "MT10", ["--resume", str(run_dir)]) == 0


def test_the_space_check_counts_what_a_save_writes(tmp_path, capsys, monkeypatch):
    MultiTaskTrainer(small_config(tmp_path, "saved", "buffer.in_checkpoint=false", PYTORCH_CHAIN)).train()  # Adam's moments exist
    archive = (tmp_path / "saved" / CHECKPOINT_NAME).stat().st_size  # networks and optimisers only
    free = archive  # room for the archive, not for the staged copy as well
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free})())
    message = error_line(capsys, small_args(tmp_path, "run", "buffer.in_checkpoint=false"))
    assert "Not enough disk space" in message and "replay buffer" not in message
    needed = _parse_size(re.search(r"a checkpoint save needs ([0-9.]+ [GM]iB)", message).group(1))
    assert 2 * archive <= needed <= 2 * 1.1 * archive  # staged copy and archive
    # the priority trees of a prioritized buffer: two float64 per slot
    message = error_line(capsys, small_args(tmp_path, "run", "buffer.in_checkpoint=false", "buffer.kind=prioritized",
                                           STORAGES["memmap"], "buffer.capacity=1000000"))
    trees = _parse_size(re.search(r"replay buffer ([0-9.]+ [GM]iB)", message).group(1))
    assert trees == pytest.approx(16 * 1_000_000, rel=0.01)


def test_a_new_run_with_an_explicit_directory_holding_a_checkpoint_is_refused(tmp_path):
    MultiTaskTrainer(small_config(tmp_path, "run")).save()
    with pytest.raises(ConfigError, match="already holds a run"):
        MultiTaskTrainer(small_config(tmp_path, "other"), tmp_path / "run")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("loss.grad_clip_norm=-1", "loss.grad_clip_norm=-1.0 must be positive or none"),
        ("loss.grad_clip_norm=0", "loss.grad_clip_norm=0.0 must be positive or none"),
        ("loss.extreme_loss_threshold=-1", "loss.extreme_loss_threshold=-1.0 must be positive or none"),
        ("loss.extreme_loss_threshold=nan", "loss.extreme_loss_threshold=nan must be a finite number"),
        ("loss.critic_lr=inf", "loss.critic_lr=inf must be a finite number"),
        ("loss.max_log_alpha=nan", "loss.max_log_alpha=nan must be a finite number"),
        ("buffer.max_priority_ratio=inf", "buffer.max_priority_ratio=inf must be a finite number"),
        ("buffer.memmap_above=-1", "buffer.memmap_above=-1 must be >= 0"),
        ("seed=-1", "seed=-1 must be in [0, 2147483647]"),
        (f"seed={2**32}", "seed=4294967296 must be in [0, 2147483647]"),
        ("device=cuda:abc", "Invalid device='cuda:abc'; accepted: auto, cpu, cuda or cuda:N (N >= 0)."),
        ("device=mps", "Invalid device='mps'"),
    ],
)
def test_values_that_change_the_method_are_refused_in_one_line(tmp_path, capsys, override, expected):
    message = error_line(capsys, small_args(tmp_path, "run", override))
    assert expected in message
    assert not (tmp_path / "run").exists()


def test_every_float_option_refuses_nan_and_infinity():
    from d2r_torchrl.training.config import RunConfig, _flatten, _field_type, apply_overrides, preset, validate

    floats = [key for key, _ in _flatten(RunConfig().to_dict()) if float in (_field_type(key), *getattr(_field_type(key), "__args__", ()))]
    assert len(floats) == 14  # env.reward_scale, 9 of loss, 4 of buffer
    for key in floats:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=re.escape(f"{key}={float(value)!r} must be a finite number")):
                validate(apply_overrides(preset("d2r", "MT10"), [f"{key}={value}"]))


def test_an_unknown_compile_backend_is_refused_before_any_work(tmp_path, capsys):
    message = error_line(capsys, small_args(tmp_path, "run", "compile.enabled=true", "compile.backend=nope"))
    assert "compile.backend='nope' is not a torch.compile backend; accepted: " in message and "inductor" in message


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["network.module_width=1000000"], "network.module_width=1000000"),
        (["network.num_modules=100000"], "network.num_modules=100000"),
        (["collector.steps_per_task=1000000000", "collector.warmup_rounds=0"], "collector.steps_per_task=1,000,000,000 x 2 tasks"),
        (["buffer.capacity=1000000000000", "buffer.memmap_above=10000000000000"], "buffer.capacity=1,000,000,000,000 in memory"),
    ],
)
def test_sizes_beyond_the_memory_are_refused_with_the_estimate(tmp_path, capsys, overrides, named):
    message = error_line(capsys, small_args(tmp_path, "run", *overrides))
    estimate, available = (float(x.replace(",", "")) for x in re.search(
        r"needs about ([0-9.,]+) GiB of host memory .* ([0-9.,]+) GiB are available", message).groups())
    assert named in message and estimate > available == pytest.approx(preflight.available_memory() / 2**30, rel=0.2)
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_counts_parameters_optimiser_states_and_targets():
    from d2r_torchrl.training.config import apply_overrides, preset

    config = apply_overrides(preset("mt_sac", "MT10"), ["env.benchmark=reach-v3,push-v3"])
    needs = preflight.memory_needs(config, observation_dim=39, action_dim=4, num_tasks=2)
    actor = (39 + 2) * 400 + 400 + 2 * (400 * 400 + 400) + 400 * 8 + 8  # MT-SAC: 3 hidden layers of 400
    critic = (43 + 2) * 400 + 400 + 2 * (400 * 400 + 400) + 400 + 1
    # actor: weights, gradients, two Adam moments; twin critics: the same and their targets
    assert needs["networks"][0] == 4 * (4 * actor + 2 * 5 * critic)
    categorical = (43 + 2) * 400 + 400 + 2 * (400 * 400 + 400) + 400 * 51 + 51  # a logit per bin
    config = apply_overrides(config, ["network.critic_value_bins=51"])
    needs = preflight.memory_needs(config, observation_dim=39, action_dim=4, num_tasks=2)
    assert needs["networks"][0] == 4 * (4 * actor + 2 * 5 * categorical)


def test_the_preflight_leaves_the_seeded_random_stream_alone(tmp_path, monkeypatch):
    """A seed gives the same initial networks whether or not the memory check ran first (it
    counts the parameters of MT-SAC's network by building one)."""
    measured = MultiTaskTrainer(small_config(tmp_path, "measured", "network.architecture=mt_sac"))
    monkeypatch.setattr(preflight, "check_memory", lambda *args, **kwargs: None)
    unmeasured = MultiTaskTrainer(small_config(tmp_path, "unmeasured", "network.architecture=mt_sac"))
    for first, second in zip(measured.loss.parameters(), unmeasured.loss.parameters(), strict=True):
        assert torch.equal(first, second)
    measured.close()
    unmeasured.close()
