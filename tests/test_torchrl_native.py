"""The pieces inside TorchRL's own loops: the loss's key conventions and SACLoss options, route
balancing carried by the loss in any loop, ``reset_parameters`` with the project's
initialisation, a loss call that raises leaving the modules usable, and D2R trained by
TorchRL's ``SACTrainer`` with the project's hooks."""
import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import SoftUpdate
from torchrl.record.loggers import CSVLogger
from torchrl.trainers.algorithms import SACTrainer

from d2r_torchrl.data.replay import make_replay_buffer
from d2r_torchrl.envs import make_env
from d2r_torchrl.modules import make_actor, make_critic
from d2r_torchrl.modules.actor_critic import ROUTE_KEY, d2r_networks
from d2r_torchrl.modules.init import HIDDEN_BIAS, OUTPUT_BOUND
from d2r_torchrl.objectives import MultiTaskSACLoss
from d2r_torchrl.training.evaluation import make_eval_envs
from d2r_torchrl.training.hooks import MetaWorldEvaluation, PerNetworkClipStepper, PerTaskLogger
from d2r_torchrl.training.update import make_sac_optimizers
from test_loss import ACT, OBS, make_batch, make_loss, make_pair

TINY_D2R = dict(num_modules=3, module_width=8, encoder_widths=(16, 16), router_widths=(16,))


def expected_temperature(log_alpha: torch.Tensor) -> torch.Tensor:
    """``T softmax(-log alpha)``, written out."""
    inverse = torch.exp(-log_alpha.detach())
    return len(inverse) * inverse / inverse.sum()


def temperatures(loss: MultiTaskSACLoss) -> list[torch.Tensor]:
    """Every routing temperature the loss holds: actor, critics, target critics."""
    out = [net.route_temperature for net in d2r_networks(loss.actor_network)]
    for params in (loss.qvalue_network_params, loss.target_qvalue_network_params):
        out += [v for k, v in params.items(True, True) if k[-1] == "route_temperature"]
    return out


def test_set_keys_renames_task_and_route_keys_in_loss_actor_and_critic():
    torch.manual_seed(0)
    actor, critic = make_pair("d2r", 2)
    loss = make_loss(actor, critic, 2)
    batch = make_batch(actor, 2)
    torch.manual_seed(1)
    expected = loss(batch.clone())

    loss.set_keys(task_id="my_task", route=("my", "route"))
    renamed = batch.clone()
    renamed.rename_key_("task_id", "my_task")
    renamed.rename_key_(("next", "task_id"), ("next", "my_task"))
    renamed.rename_key_(ROUTE_KEY, ("my", "route"))
    del renamed["routing"]
    torch.manual_seed(1)
    got = loss(renamed)
    for key in ("loss_actor", "loss_qvalue", "loss_alpha"):
        torch.testing.assert_close(got[key], expected[key], msg=key)
    assert "my_task" in actor.in_keys and "task_id" not in actor.in_keys
    assert ("my", "route") in actor.out_keys and "my_task" in critic.in_keys
    assert {("my", "route"), "my_task", ("next", "my_task")} <= set(loss.in_keys)
    with set_exploration_type(ExplorationType.RANDOM):  # the collector's actor writes the new key
        out = actor(TensorDict(observation=torch.randn(4, OBS), my_task=torch.tensor([0, 1, 0, 1]), batch_size=[4]))
    assert out[("my", "route")].shape == (4, 10)  # N(N+1)/2 for 4 modules
    with pytest.raises(ValueError, match="not an accepted"):
        loss.set_keys(task="x")


def test_in_keys_name_the_route_and_out_keys_the_per_task_outputs():
    actor, critic = make_pair("d2r", 2)
    loss = make_loss(actor, critic, 2)
    assert {ROUTE_KEY, "task_id", ("next", "task_id"), ("next", "observation")} <= set(loss.in_keys)
    out = loss(make_batch(actor, 2))
    assert set(out.keys()) == set(loss.out_keys)
    assert "route_temperature" not in loss.out_keys and "task_loss" in loss.out_keys


def test_reductions_sum_and_none_agree_with_mean():
    """``sum`` is ``B`` times ``mean``; the batch mean of the ``none`` losses is ``mean``, with
    uneven task counts and importance weights."""
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 3)
    losses = {r: make_loss(actor, critic, 3, reduction=r) for r in ("mean", "sum", "none")}
    for other in ("sum", "none"):
        losses[other].load_state_dict(losses["mean"].state_dict())
    batch = make_batch(actor, 3)[:20]  # 7, 7 and 6 samples
    batch["priority_weight"] = torch.rand(20)
    out = {}
    for reduction, loss in losses.items():
        torch.manual_seed(1)
        out[reduction] = loss(batch.clone())
    for key in ("loss_actor", "loss_qvalue", "loss_alpha"):
        torch.testing.assert_close(out["sum"][key], 20 * out["mean"][key])
        assert out["none"][key].shape == (20,)
        torch.testing.assert_close(out["none"][key].mean(), out["mean"][key])
    with pytest.raises(ValueError, match="reduction"):
        make_loss(actor, critic, 3, reduction="max")


def test_target_entropy_fixed_alpha_and_alpha_bounds():
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 2)
    loss = make_loss(actor, critic, 2, target_entropy=-0.5, alpha_init=0.3, max_alpha=0.5)
    batch = make_batch(actor, 2, per_task=16)
    out = loss(batch)
    log_prob = -out["entropy"]  # the batch mean of log pi, as both tasks have 16 samples
    torch.testing.assert_close(out["loss_alpha"], -math.log(0.3) * (log_prob + (-0.5)))
    with torch.no_grad():
        loss.log_alpha.copy_(torch.tensor([0.2, -3.0]))  # alpha 1.22 > max_alpha
    torch.testing.assert_close(loss(batch)["alpha"], torch.tensor([0.5, math.exp(-3.0)]))

    fixed = make_loss(actor, critic, 2, fixed_alpha=True, alpha_init=0.2)
    assert all(p is not fixed.log_alpha for p in fixed.parameters())
    optimizers = make_sac_optimizers(fixed)
    assert set(optimizers) == {"actor", "critic"}
    out = fixed(batch)
    (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).backward()
    for optimizer in optimizers.values():
        optimizer.step()
    torch.testing.assert_close(fixed(batch)["alpha"], torch.full((2,), 0.2))
    with pytest.raises(ValueError, match="min_alpha 2.0 is above max_alpha 1.0"):
        make_loss(actor, critic, 2, min_alpha=2.0, max_alpha=1.0)


@pytest.mark.parametrize("separate_alpha_optimizer", [False, True])
def test_route_balancing_follows_every_optimiser_step_without_after_update(separate_alpha_optimizer):
    """A plain TorchRL loop (loss, backward, optimiser step, SoftUpdate) never calls
    ``after_update``: the temperatures still follow log alpha after every step, and the cap holds."""
    torch.manual_seed(0)
    actor, critic = make_pair("d2r", 3)
    loss = make_loss(actor, critic, 3)
    updater = SoftUpdate(loss, tau=0.1)
    if separate_alpha_optimizer:
        optimizers = [torch.optim.Adam([p for p in loss.parameters() if p is not loss.log_alpha], lr=1e-3),
                      torch.optim.SGD([loss.log_alpha], lr=5.0)]
    else:
        optimizers = [torch.optim.Adam(loss.parameters(), lr=0.5)]
    for _ in range(3):
        batch = make_batch(actor, 3)
        batch["next", "reward"] = torch.arange(3.0)[batch["task_id"]].unsqueeze(-1)
        out = loss(batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).backward()
        for optimizer in optimizers:
            optimizer.step()
        updater.step()
        assert (loss.log_alpha <= 0).all()
        for temperature in temperatures(loss):
            for row in temperature.reshape(-1, 3):  # the twin critics' are stacked
                torch.testing.assert_close(row, expected_temperature(loss.log_alpha))
    assert not torch.allclose(temperatures(loss)[0], torch.ones(3))


def test_reset_parameters_follows_the_project_initialisation():
    torch.manual_seed(0)
    actor, critic = make_pair("d2r", 2)
    loss = make_loss(actor, critic, 2)
    network = actor.module[0].network
    before = network.module_weight.detach().clone()
    loss.reset_parameters_recursive()
    assert not torch.equal(network.module_weight, before)
    bound = 1 / math.sqrt(network.module_weight.shape[-1])
    assert network.module_weight.abs().max() <= bound and (network.module_bias == HIDDEN_BIAS).all()
    assert (network.first_module.bias == HIDDEN_BIAS).all() and (network.state_encoder[0].bias == HIDDEN_BIAS).all()
    assert network.head.weight.abs().max() <= OUTPUT_BOUND
    critics = loss.qvalue_network_params
    stacked = critics["network", "module_weight"]
    assert not torch.equal(stacked[0], stacked[1]) and stacked.abs().max() <= bound
    assert (critics["network", "module_bias"] == HIDDEN_BIAS).all()
    torch.testing.assert_close(loss.target_qvalue_network_params.data, critics.data)
    spec = Bounded(-1.0, 1.0, (ACT,))
    small = {"mt_sac": dict(hidden_widths=(16, 16)),
             "soft_modular": dict(encoder_widths=(16, 16), gating_widths=(16, 16), module_width=8)}
    for architecture, sizes in small.items():
        other = make_actor(architecture, OBS, spec, 2, **sizes)
        net = other.module[0].network
        net.head.weight.data.fill_(1.0)
        other.reset_parameters_recursive()
        assert net.head.weight.abs().max() <= OUTPUT_BOUND
        hidden = [m for m in net.modules() if isinstance(m, torch.nn.Linear) and m.bias.abs().max() > OUTPUT_BOUND]
        assert hidden and all((m.bias == HIDDEN_BIAS).all() for m in hidden)


@pytest.mark.parametrize("architecture", ["d2r", "mt_sac"])
def test_a_loss_call_that_raises_leaves_every_module_usable(architecture):
    actor, critic = make_pair(architecture, 2)
    loss = make_loss(actor, critic, 2)
    good = make_batch(actor, 2)
    bad = good.clone()
    bad["action"] = torch.randn(bad.shape[0], ACT + 1)
    with pytest.raises(ValueError, match="width"):
        loss(bad)
    assert torch.isfinite(loss(good.clone())["loss_qvalue"])
    assert critic(good.clone())["state_action_value"].shape == (16, 1)
    assert actor(good.clone())["action"].shape == (16, ACT)


def test_route_temperatures_reach_collector_workers():
    """``update_policy_weights_()`` sends the actor's routing temperatures (buffers) to the
    workers of a multi-process collector."""
    tasks = ["reach-v3", "push-v3"]
    factory = lambda: make_env(tasks, max_episode_steps=5)  # noqa: E731
    spec = factory().full_action_spec["action"][0]
    actor = make_actor("d2r", 39, spec, num_tasks=2, **TINY_D2R)
    loss = MultiTaskSACLoss(actor, make_critic("d2r", 39, 4, num_tasks=2, **TINY_D2R), num_tasks=2)
    collector = MultiSyncCollector([factory], actor, frames_per_batch=4, total_frames=-1,
                                   auto_register_policy_transforms=False)
    try:
        with torch.no_grad():
            loss.log_alpha.copy_(torch.tensor([-2.0, 0.0]))
        torch.optim.SGD([loss.log_alpha], lr=0.0).step()  # any optimiser step: route balancing runs
        collector.update_policy_weights_()
        worker = collector.state_dict()["worker0"]["policy_state_dict"]
        (temperature,) = [value for key, value in worker.items() if key.endswith("route_temperature")]
        torch.testing.assert_close(temperature, expected_temperature(torch.tensor([-2.0, 0.0])))
    finally:
        collector.shutdown()


def test_torchrl_sac_trainer_trains_d2r_with_the_project_hooks(tmp_path):
    """TorchRL's ``SACTrainer`` with a stock ``Collector`` and ``SoftUpdate``, the per-task
    prioritized buffer (written by TorchRL's ``ReplayBufferTrainer``), the project's stepper,
    per-task logger and Meta-World evaluation: unequal per-task temperatures give unequal
    routing temperatures, priorities are updated, and per-task alphas, routing temperatures
    and success are logged."""
    tasks = ["reach-v3", "push-v3"]
    env = make_env(tasks, max_episode_steps=10)
    spec = env.full_action_spec["action"][0]
    actor = make_actor("d2r", 39, spec, num_tasks=2, **TINY_D2R)
    loss = MultiTaskSACLoss(actor, make_critic("d2r", 39, 4, num_tasks=2, **TINY_D2R), num_tasks=2)
    loss.make_value_estimator(gamma=0.99)
    with torch.no_grad():
        loss.log_alpha.copy_(torch.tensor([-1.0, 0.0]))
    collector = Collector(env, actor, frames_per_batch=20, total_frames=60, auto_register_policy_transforms=False)
    buffer = make_replay_buffer("stratified_prioritized", capacity=100, batch_size=16, num_tasks=2)
    with pytest.warns(UserWarning, match="experimental"):
        trainer = SACTrainer(
            collector=collector, total_frames=60, frame_skip=1, optim_steps_per_batch=2, loss_module=loss,
            replay_buffer=buffer,
            target_net_updater=SoftUpdate(loss, tau=0.005), logger=CSVLogger("sac", log_dir=str(tmp_path)),
            log_interval=0, progress_bar=False, log_rewards=False,
        )
    PerNetworkClipStepper(make_sac_optimizers(loss)).register(trainer)
    PerTaskLogger(loss, tasks).register(trainer)
    eval_envs = make_eval_envs(tasks, goals="random", seed=0, max_episode_steps=10)
    MetaWorldEvaluation(actor, eval_envs, tasks, episodes_per_task=1, interval=3).register(trainer)
    trainer.train()

    temperature = d2r_networks(actor)[0].route_temperature
    torch.testing.assert_close(temperature, expected_temperature(loss.log_alpha))
    assert buffer.writer.task_writes.tolist() == [30, 30]
    assert not torch.isnan(buffer.sampler.task_cap).any()  # priorities came back from the loss
    assert temperature[0] > 1.2 > 0.8 > temperature[1]  # the task with the smaller alpha explores routes more
    scalars = tmp_path / "sac" / "scalars"
    for name in ("train/alpha", "train/route_temperature", "train/route_depth", "eval/success"):
        for task in tasks:
            rows = (scalars / name / f"{task}.csv").read_text().split()
            assert rows and all(math.isfinite(float(row.split(",")[1])) for row in rows)
    logged = float((scalars / "train/route_temperature" / "reach-v3.csv").read_text().split()[-1].split(",")[1])
    assert logged == pytest.approx(float(temperature[0]), rel=1e-2)
