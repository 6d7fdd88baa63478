"""Training pipeline: recipe entry point, resume, collectors/buffers, config, README example."""
import csv
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from d2r_torchrl.data.replay import TaskStratifiedSampler, make_replay_buffer, prepare_transitions
from d2r_torchrl.modules.actor_critic import ROUTE_KEY
from d2r_torchrl.training import builders
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME, ResumeError
from d2r_torchrl.training.cli import main, parse
from d2r_torchrl.training.config import ConfigError, RunConfig, apply_overrides, differences, preset
from d2r_torchrl.training.trainer import MultiTaskTrainer
from d2r_torchrl.training.update import NonFiniteLossError, clip_grad_norm_stacked_

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "collector.steps_per_task=10",
    "collector.warmup_rounds=1",
    "collector.updates_per_round=2",
    "collector.total_steps_per_task=30",
    "env.max_episode_steps=10",
    "buffer.batch_size_per_task=4",
    "buffer.capacity=1000",
    "eval.interval_rounds=3",
    "eval.episodes_per_task=1",
    "log.progress_bar=false",
    "device=cpu",
]
TWO_TASKS = "env.benchmark=reach-v3,push-v3"


def tiny_config(tmp_path, *extra, algorithm="d2r"):
    config = preset(algorithm, "MT10")
    return apply_overrides(config, [*TINY, f"log.root={tmp_path}", TWO_TASKS, *extra])


def test_recipe_entry_point_writes_per_task_success(tmp_path):
    code = main("d2r", "MT10", [*TINY, f"log.root={tmp_path}", "log.name=mt10"])
    assert code == 0
    run_dir = tmp_path / "mt10"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env"]["benchmark"] == "MT10" and config["collector"]["updates_per_round"] == 2
    success_files = sorted((run_dir / "scalars" / "eval" / "success").glob("*.csv"))
    assert len(success_files) == 10
    rows = list(csv.reader(success_files[0].open()))
    assert rows and 0.0 <= float(rows[-1][-1]) <= 1.0
    assert (run_dir / "scalars" / "eval" / "success_mean.csv").exists()
    returns = [float(row[-1]) for row in csv.reader((run_dir / "scalars" / "eval" / "return_mean.csv").open())]
    per_task = [
        float(list(csv.reader(path.open()))[-1][-1])
        for path in sorted((run_dir / "scalars" / "eval" / "return").glob("*.csv"))
    ]
    assert len(per_task) == 10 and returns[-1] == pytest.approx(sum(per_task) / 10, rel=1e-5)
    assert returns[-1] > 0  # Meta-World rewards are positive
    masked = sorted((run_dir / "scalars" / "train" / "masked_updates").glob("*.csv"))
    counts = [float(list(csv.reader(path.open()))[-1][-1]) for path in masked]
    assert len(counts) == 10 and all(count in (0.0, 1.0, 2.0) for count in counts)  # of 2 updates per round
    assert not (run_dir / "scalars" / "train" / "clipped_targets").exists()  # no TD-target bound


def test_q_max_logged_per_round_is_the_largest_over_its_updates(tmp_path):
    """The update's ``task_q_max`` replaced by a scripted sequence after each real update:
    task 0 falls (its round's first value is the largest), task 1 rises from a NaN (a
    task absent from the first batch of every round)."""
    config = tiny_config(tmp_path, "log.name=run", "collector.updates_per_round=3", algorithm="mt_sac")
    trainer = MultiTaskTrainer(config)
    update, calls = trainer.update, []

    def scripted_update():
        out = update()
        n = len(calls)
        out["task_q_max"] = torch.tensor([100.0 - n, float("nan") if n % 3 == 0 else float(n)])
        calls.append(trainer.counters.frames)
        return out

    trainer.update = scripted_update
    trainer.train()
    rounds = sorted(set(calls))
    assert len(rounds) >= 2 and len(calls) == 3 * len(rounds)
    expected = {
        0: [100.0 - calls.index(f) for f in rounds],
        1: [float(len(calls) - 1 - calls[::-1].index(f)) for f in rounds],
    }
    for index, task in enumerate(trainer.tasks):
        path = tmp_path / "run" / "scalars" / "train" / "q_max" / f"{task}.csv"
        rows = [(int(step), float(value)) for step, value in csv.reader(path.open())]
        assert rows == [(step, value) for step, value in zip(rounds, expected[index])]


def _stop_after(trainer: MultiTaskTrainer, updates: int) -> None:
    update = trainer.update

    def update_then_signal():
        out = update()
        if trainer.counters.updates == updates:
            trainer._on_signal(signal.SIGINT, None)
        return out

    trainer.update = update_then_signal


def test_stop_and_resume_continue_from_checkpoint(tmp_path):
    trainer = MultiTaskTrainer(tiny_config(tmp_path, "log.name=run", "collector.total_steps_per_task=60"))
    _stop_after(trainer, 3)
    trainer.train()
    assert trainer.counters.updates == 3 and trainer.interrupted
    saved_alpha = trainer.loss.log_alpha.detach().clone()
    saved_params = trainer.loss.actor_network_params.clone()
    resumed = MultiTaskTrainer.resume(tmp_path / "run")
    assert resumed.counters.state_dict() == trainer.counters.state_dict()
    torch.testing.assert_close(resumed.loss.log_alpha.detach(), saved_alpha)
    assert (resumed.loss.actor_network_params == saved_params).all()
    frames_before = resumed.counters.frames
    resumed.train()
    assert resumed.counters.frames == 60 * 2 and resumed.counters.frames > frames_before
    assert resumed.counters.updates > 3 and not resumed.interrupted


def test_train_again_after_interruption_runs_to_the_end(tmp_path):
    trainer = MultiTaskTrainer(tiny_config(tmp_path, "log.name=run", "eval.episodes_per_task=0"))
    _stop_after(trainer, 1)
    trainer.train()
    assert trainer.interrupted and trainer.counters.frames < 60
    trainer.train()
    assert not trainer.interrupted and trainer.counters.frames == 60


def test_corrupt_checkpoint_raises_and_is_left_untouched(tmp_path):
    trainer = MultiTaskTrainer(tiny_config(tmp_path, "log.name=run"))
    trainer.save()
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="corrupt"):
        MultiTaskTrainer.resume(tmp_path / "run")
    assert checkpoint.read_bytes() == b"not a checkpoint"
    with pytest.raises(ResumeError, match="config.json"):
        MultiTaskTrainer.resume(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "collector,buffer",
    [("sync", "stratified"), ("multi_sync", "prioritized"), ("multi_async", "uniform"), ("sync", "stratified_prioritized")],
)
def test_each_collector_and_buffer_runs_updates(tmp_path, collector, buffer):
    config = tiny_config(
        tmp_path, f"collector.kind={collector}", f"buffer.kind={buffer}", "eval.episodes_per_task=0"
    )
    trainer = MultiTaskTrainer(config)
    trainer.train()
    assert trainer.counters.updates >= 2
    assert trainer.counters.frames >= 60


def test_warmup_rounds_run_no_update(tmp_path):
    # 3 rounds of 10 steps per task, 1 warm-up round, 2 updates per round -> rounds 2 and 3 update
    trainer = MultiTaskTrainer(tiny_config(tmp_path, "eval.episodes_per_task=0"))
    trainer.train()
    assert (trainer.counters.rounds, trainer.counters.updates) == (3, 4)


def test_random_warmup_stores_no_behaviour_route(tmp_path):
    trainer = MultiTaskTrainer(
        tiny_config(
            tmp_path,
            "collector.warmup_policy=random",
            "collector.total_steps_per_task=20",
            "buffer.kind=uniform",
            "eval.episodes_per_task=0",
        )
    )
    trainer.train()
    stored = trainer.buffer[:]
    routes = stored[ROUTE_KEY]
    assert routes.shape == (40, 136)
    warmup, later = routes[:20], routes[20:]
    assert not warmup.any(), "random warm-up transitions must carry an empty route"
    assert (later.sum(-1) == 31).all(), "policy transitions carry a k-hot route (1 + 2 * 15 sources)"


def test_prepare_transitions_keeps_the_order_and_stratified_sampler_balances_any_layout():
    task_id = torch.arange(3).unsqueeze(1).expand(3, 4)
    batch = TensorDict(
        observation=torch.randn(3, 4, 39),
        task_id=task_id,
        action=torch.randn(3, 4, 2),
        batch_size=[3, 4],
    )
    flat = prepare_transitions(batch, num_route_logits=6)
    assert flat["task_id"].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # task-major, as collected
    assert flat[ROUTE_KEY].shape == (12, 6) and not flat[ROUTE_KEY].any()
    buffer = make_replay_buffer("stratified", capacity=30, batch_size=9, num_tasks=3)
    buffer.extend(flat)
    buffer.extend(prepare_transitions(batch[:, :3].reshape(-1)[:-1]))  # tasks unequally: 3, 3, 2
    assert buffer.writer.task_writes.tolist() == [7, 7, 6]
    sample = buffer.sample()
    assert torch.bincount(sample["task_id"], minlength=3).tolist() == [3, 3, 3]
    assert isinstance(buffer._sampler, TaskStratifiedSampler)


def test_config_errors_and_help(capsys):
    with pytest.raises(ConfigError, match="Unknown config key 'loss.gama'"):
        parse("d2r", "MT10", ["loss.gama=0.9"])
    with pytest.raises(ConfigError, match="accepted"):
        parse("d2r", "MT10", ["buffer.kind=fancy"])
    with pytest.raises(ConfigError, match="expected float"):
        parse("d2r", "MT10", ["loss.gamma=abc"])
    with pytest.raises(ConfigError, match="env.benchmark"):
        parse("d2r", "MT10", ["env.benchmark=MT7"])
    # 2 warm-up rounds x 10 steps x 10 tasks = 200 frames: a 200-slot buffer would never update
    with pytest.raises(ConfigError, match="must exceed the 200 warm-up frames"):
        parse("d2r", "MT10", ["buffer.capacity=200", "collector.warmup_rounds=2", "collector.steps_per_task=10"])
    config = parse("d2r", "MT10", ["loss.max_log_alpha=none", "env.goals=random"]).config
    assert config.loss.max_log_alpha is None and config.env.goals == "random"
    assert main("d2r", "MT10", ["collector.steps_per_task=0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("d2r", "MT10", ["--help"])
    assert "buffer.kind = 'stratified_prioritized'" in capsys.readouterr().out


def test_cli_refuses_bad_values_with_one_line_naming_them(capsys):
    for argv, expected in [
        (["loss.gamma=abc"], "error: Invalid value 'abc' for loss.gamma: expected float"),
        (["collector.steps_per_task=1.5"], "error: Invalid value '1.5' for collector.steps_per_task: expected int"),
        (["loss.gamma=1.5"], "error: Invalid configuration: loss.gamma=1.5 must be in (0, 1]."),
        (["buffer.max_priority_ratio=0.5"], "buffer.max_priority_ratio=0.5 must be >= 1 or none"),
        (["network.architecture=mlp"], "network.architecture='mlp' is not accepted; accepted: ['d2r',"),
        (["net.width=3"], "error: Unknown config key 'net.width'; accepted keys: seed, device, env.benchmark"),
    ]:
        assert main("d2r", "MT10", argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_config_json_of_an_earlier_version_loads_with_todays_defaults():
    # as an earlier version wrote it: a key removed since, none of the keys added since
    old = preset("d2r", "MT10").to_dict()
    old["compile"]["chain_kernels"] = True
    for key in ("priority_beta_final", "max_priority_ratio"):
        del old["buffer"][key]
    old["loss"]["gamma"] = 0.98
    loaded = RunConfig.from_dict(old)
    assert loaded.loss.gamma == 0.98 and loaded.buffer.max_priority_ratio == 10.0
    assert "chain_kernels" not in loaded.to_dict()["compile"]
    assert differences(old, loaded.to_dict()) == {}  # a resumed run finds nothing changed
    # a run from before beta was annealed keeps its constant beta
    assert loaded.buffer.priority_beta_final == loaded.buffer.priority_beta == 0.4
    assert differences(old, preset("d2r", "MT10").to_dict()) == {
        "buffer.priority_beta_final": (0.4, 1.0),
        "loss.gamma": (0.98, 0.99),
    }


def test_presets_follow_reference_values():
    mt10, mt50 = preset("d2r", "MT10"), preset("d2r", "MT50")
    assert (mt10.buffer.capacity, mt50.buffer.capacity) == (1_000_000, 10_000_000)
    assert (mt10.collector.total_steps_per_task, mt50.collector.total_steps_per_task) == (1_500_000, 1_000_000)
    assert mt10.buffer.batch_size_per_task * 10 == 1280 and mt50.buffer.batch_size_per_task * 50 == 6400
    assert not preset("mt_sac", "MT10").loss.loss_balancing and preset("soft_modular", "MT50").network.soft_modular_preset == "deep"
    # random goals (Meta-World v3's standard), the design's per-task prioritized replay and the
    # reference's extreme-task threshold under the rule that cannot freeze a task
    assert (mt10.env.goals, mt10.buffer.kind) == ("random", "stratified_prioritized")
    assert (mt10.loss.extreme_loss_threshold, mt10.loss.extreme_loss_rule) == (3000.0, "clip")


@pytest.mark.parametrize("example", range(4))
def test_readme_examples_run(tmp_path, example):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 4
    script = tmp_path / "example.py"
    script.write_text(blocks[example])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_stacked_critics_are_clipped_one_by_one():
    weight = torch.zeros(2, 3, requires_grad=True)
    bias = torch.zeros(2, 1, requires_grad=True)
    weight.grad = torch.tensor([[2.0, 2.0, 0.0], [0.3, 0.0, 0.0]])
    bias.grad = torch.tensor([[1.0], [0.4]])  # network norms: 3 and 0.5
    norms = clip_grad_norm_stacked_([weight, bias], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(weight.grad[0], torch.tensor([2.0, 2.0, 0.0]) / 3, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad[1], torch.tensor([0.3, 0.0, 0.0]))
    torch.testing.assert_close(bias.grad[:, 0], torch.tensor([1.0 / 3, 0.4]), atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_before_any_change(tmp_path):
    trainer = MultiTaskTrainer(tiny_config(tmp_path, "buffer.kind=uniform"))
    trainer.buffer.extend(_transitions_with_nan_reward(trainer))
    before = trainer.loss.actor_network_params.clone()
    with pytest.raises(NonFiniteLossError, match=f"no checkpoint of this run was saved in {trainer.run_dir} yet") as raised:
        trainer.update()
    assert "last good checkpoint" not in str(raised.value)  # there is none
    trainer.save()
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        trainer.update()
    assert (trainer.loss.actor_network_params == before).all()


def _transitions_with_nan_reward(trainer: MultiTaskTrainer) -> TensorDict:
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        data = builders.env_factory(trainer.config, trainer.tasks)().rollout(3, trainer.actor)
    data["next", "reward"] = torch.full_like(data["next", "reward"], float("nan"))
    return prepare_transitions(data, trainer.num_route_logits)


def test_new_run_refuses_to_overwrite_existing_run(tmp_path):
    MultiTaskTrainer(tiny_config(tmp_path, "log.name=run")).save()
    with pytest.raises(ConfigError, match="--resume"):
        MultiTaskTrainer(tiny_config(tmp_path, "log.name=run"))
