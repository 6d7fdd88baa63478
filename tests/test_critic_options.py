"""Critic options: LayerNorm in the hidden layers, clipped TD targets, per-task reward scales."""
import math

import gymnasium as gym
import pytest
import torch
from torchrl.data import Bounded

from d2r_torchrl.data.replay import random_transitions
from d2r_torchrl.modules.actor_critic import make_actor, make_critic
from d2r_torchrl.modules.routing import RoutingMode, set_routing_mode
from d2r_torchrl.modules.value_heads import HLGaussValue
from d2r_torchrl.objectives import MultiTaskSACLoss
from d2r_torchrl.objectives.value_targets import PerTaskRewardScale, soft_return_bound
from d2r_torchrl.training import builders
from d2r_torchrl.training.config import ConfigError, RunConfig, apply_overrides, preset, validate
from d2r_torchrl.training.trainer import MultiTaskTrainer

OBS, ACT, TASKS = 5, 2, 2
TINY = {
    "d2r": dict(num_modules=3, module_width=8, encoder_widths=(16, 16), router_widths=(16,)),
    "soft_modular": dict(num_layers=2, num_modules=2, module_width=8, encoder_widths=(16, 16), gating_widths=(16,)),
    "mt_sac": dict(hidden_widths=(16, 16)),
    "mh_sac": dict(hidden_widths=(16, 16)),
}

# Two tasks, 3 rounds of 10 steps per task (1 warm-up), 2 updates per round, no evaluation.
TINY_RUN = [
    "env.benchmark=reach-v3,push-v3",
    "env.max_episode_steps=10",
    "collector.steps_per_task=10",
    "collector.warmup_rounds=1",
    "collector.updates_per_round=2",
    "collector.total_steps_per_task=30",
    "buffer.kind=stratified",
    "buffer.batch_size_per_task=4",
    "buffer.capacity=1000",
    "eval.episodes_per_task=0",
    "log.progress_bar=false",
    "device=cpu",
]


def hidden_layers(network) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` of every hidden layer the option normalises, listed by hand."""
    encoder = getattr(network, "trunk", None) or network.state_encoder
    layers = [(m.weight, m.bias) for m in encoder if isinstance(m, torch.nn.Linear)]
    if hasattr(network, "first_module"):  # D2R: module 1, then modules 2..N stacked
        layers.append((network.first_module.weight, network.first_module.bias))
        layers += [(network.module_weight[g], network.module_bias[g]) for g in range(len(network.module_bias))]
    if hasattr(network, "layers"):  # Soft Modularization's modules
        layers += [(m.weight, m.bias) for layer in network.layers for m in layer]
    return layers


def critic_output(critic, features, task_id):
    network = critic.network
    with torch.no_grad():
        out = network(features, task_id)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("architecture", list(TINY))
def test_layer_norm_makes_each_hidden_layer_scale_free(architecture):
    """``LN(c z) = LN(z)`` for ``c > 0``: with the option, scaling any one hidden layer's weight
    and bias by 3 leaves ``Q`` unchanged; without it, it changes ``Q``."""
    features, task_id = torch.randn(6, OBS + ACT), torch.arange(6) % TASKS
    for layer_norm in (True, False):
        torch.manual_seed(0)
        critic = make_critic(architecture, OBS, ACT, TASKS, layer_norm=layer_norm, **TINY[architecture])
        with set_routing_mode(RoutingMode.TOPK):
            base = critic_output(critic, features, task_id)
            changed = []
            for weight, bias in hidden_layers(critic.network):
                with torch.no_grad():
                    weight.mul_(3.0), bias.mul_(3.0)
                changed.append(not torch.allclose(critic_output(critic, features, task_id), base, rtol=1e-4, atol=1e-5))
                with torch.no_grad():
                    weight.div_(3.0), bias.div_(3.0)
        assert len(changed) >= 2
        assert not any(changed) if layer_norm else any(changed), (layer_norm, changed)


def test_layer_norm_off_keeps_the_reference_parameters():
    for architecture, sizes in TINY.items():
        keys = make_critic(architecture, OBS, ACT, TASKS, **sizes).state_dict().keys()
        assert not [key for key in keys if "norm" in key], architecture


def test_d2r_layer_norm_critic_trains_under_the_loss_on_either_chain_setting():
    """The twin critics run under ``torch.vmap``; with LayerNorm D2R takes the plain-autograd
    chain whatever ``native_chain`` says, so both settings give the same losses and gradients."""
    spec = Bounded(-1.0, 1.0, (ACT,))
    results = []
    for native in (True, False):
        torch.manual_seed(0)
        actor = make_actor("d2r", OBS, spec, TASKS, native_chain=native, **TINY["d2r"])
        critic = make_critic("d2r", OBS, ACT, TASKS, layer_norm=True, native_chain=native, **TINY["d2r"])
        loss = MultiTaskSACLoss(actor, critic, num_tasks=TASKS)
        loss.make_value_estimator(gamma=0.9)
        batch = random_transitions(actor, TASKS, 8, OBS, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(1)
        out = loss(batch)
        out["loss_qvalue"].backward()
        gain = loss.qvalue_network_params["network", "module_norm_weight"]
        results.append((out["loss_qvalue"].detach(), gain.grad.clone()))
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_soft_return_bound_hand_worked():
    assert soft_return_bound(10.0, 0.99) == pytest.approx(1000.0)  # Meta-World, reward scale 1
    assert soft_return_bound(10.0, 0.99, horizon=200) == pytest.approx(10 * (1 - 0.99**200) / 0.01)  # 866.0
    assert soft_return_bound(10.0, 0.99, horizon=200) == pytest.approx(866.0, abs=0.05)
    assert soft_return_bound(1.0, 0.99, max_alpha=1.0, action_dim=4) == pytest.approx(100 * (1 + 4 * math.log(2)))
    with pytest.raises(ValueError, match="gamma < 1"):
        soft_return_bound(1.0, 1.0)


def tiny_loss(num_tasks: int = TASKS, **kwargs) -> tuple[MultiTaskSACLoss, torch.nn.Module]:
    torch.manual_seed(0)
    spec = Bounded(-1.0, 1.0, (ACT,))
    actor = make_actor("mt_sac", OBS, spec, num_tasks, **TINY["mt_sac"])
    loss = MultiTaskSACLoss(actor, make_critic("mt_sac", OBS, ACT, num_tasks, **TINY["mt_sac"]), num_tasks=num_tasks, **kwargs)
    loss.make_value_estimator(gamma=0.9)
    return loss, actor


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_td_target_is_clipped_to_the_bound(sign):
    """Rewards of +-1e4 give targets far past a bound of 50: clipped, ``|Q - y|`` is 50 up to the
    tiny initial ``Q``; without the option it is about 1e4."""
    errors, outs = {}, {}
    for bound in (50.0, None):
        loss, actor = tiny_loss(td_target_bound=bound)
        batch = random_transitions(actor, TASKS, 8, OBS, generator=torch.Generator().manual_seed(2))
        batch["next", "reward"].fill_(sign * 1e4)
        outs[bound] = loss(batch)
        errors[bound] = batch["td_error"]
    torch.testing.assert_close(errors[50.0], torch.full((8,), 50.0), atol=0.5, rtol=0)
    assert (errors[None] > 0.9 * 1e4).all()
    torch.testing.assert_close(outs[50.0]["task_clipped"], torch.ones(TASKS))
    assert "task_clipped" not in outs[None].keys()
    with pytest.raises(ValueError, match="td_target_bound must be a finite positive number"):
        tiny_loss(td_target_bound=0.0)


def test_clipped_fraction_per_task_and_in_the_trainers_log(tmp_path):
    """Rewards of 1e4 on all of task 0's samples and half of task 1's, 0 elsewhere (targets
    then within 50 of 0): fractions 1 and 0.5. A run whose bound clips every target logs 1."""
    loss, actor = tiny_loss(td_target_bound=50.0)
    batch = random_transitions(actor, TASKS, 8, OBS, generator=torch.Generator().manual_seed(2))
    task_id = batch["task_id"].flatten()
    of_task_1 = (task_id == 1).nonzero().flatten()
    assert (task_id == 0).sum() == 4 and len(of_task_1) == 4
    large = (task_id == 0) | torch.isin(torch.arange(8), of_task_1[:2])
    batch["next", "reward"] = torch.where(large, 1e4, 0.0).unsqueeze(-1)
    torch.testing.assert_close(loss(batch)["task_clipped"], torch.tensor([1.0, 0.5]))

    overrides = [*TINY_RUN, f"log.root={tmp_path}", "log.name=run", "loss.clip_td_target=true"]
    trainer = MultiTaskTrainer(apply_overrides(preset("mt_sac", "MT10"), overrides))
    trainer.loss.td_target_bound = 1e-6  # every target beyond it
    trainer.train()
    logged = sorted((tmp_path / "run" / "scalars" / "train" / "clipped_targets").glob("*.csv"))
    assert [path.stem for path in logged] == ["push-v3", "reach-v3"]
    assert all(float(path.read_text().split()[-1].split(",")[1]) == 1.0 for path in logged)


def test_per_task_reward_scale_hand_worked():
    scale = PerTaskRewardScale(3, floor=0.1)
    task_id = torch.tensor([0, 0, 1, 1, 2])
    out = scale(torch.tensor([[2.0], [4.0], [0.5], [-1.0], [0.01]]), task_id)
    torch.testing.assert_close(out, torch.tensor([[0.5], [1.0], [0.5], [-1.0], [0.1]]))  # scales 4, 1, floor 0.1
    out = scale(torch.tensor([8.0, 0.5, 0.02]), torch.tensor([0, 1, 2]))  # task 0's scale grows to 8
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 0.2]))
    torch.testing.assert_close(scale.max_abs_reward, torch.tensor([8.0, 1.0, 0.02]))
    out = scale(torch.tensor([float("nan"), float("inf"), 2.0]), torch.tensor([0, 1, 1]))  # kept out of the scales
    torch.testing.assert_close(scale.max_abs_reward, torch.tensor([8.0, 2.0, 0.02]))
    assert out[0].isnan() and out[1].isinf() and out[2] == 1.0


def test_loss_normalises_rewards_per_task_and_keeps_the_scales_in_its_state_dict():
    """With terminal transitions ``y = r``: the normalising loss matches a plain loss fed the
    rewards divided by hand (task 0 by 3, task 1 by its floor 0.5)."""
    normalising, actor = tiny_loss(reward_normalization=PerTaskRewardScale(TASKS, floor=0.5))
    plain, _ = tiny_loss()
    batch = random_transitions(actor, TASKS, 8, OBS, generator=torch.Generator().manual_seed(2))
    batch["next", "terminated"].fill_(True)
    batch["next", "reward"] = torch.tensor([[3.0], [0.2], [1.5], [0.4], [-3.0], [0.1], [0.0], [0.3]])
    by_hand = batch.clone()
    by_hand["next", "reward"] = batch["next", "reward"] / torch.tensor([3.0, 0.5]).repeat(4).unsqueeze(-1)
    torch.manual_seed(3)
    got = normalising(batch)["loss_qvalue"]
    torch.manual_seed(3)
    torch.testing.assert_close(got, plain(by_hand)["loss_qvalue"])
    state = normalising.state_dict()
    torch.testing.assert_close(state["reward_normalization.max_abs_reward"], torch.tensor([3.0, 0.4]))
    resumed, _ = tiny_loss(reward_normalization=PerTaskRewardScale(TASKS, floor=0.5))
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.reward_normalization.max_abs_reward, torch.tensor([3.0, 0.4]))


def pendulum_loss(overrides: list[str]) -> MultiTaskSACLoss:
    env = gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")])
    config = validate(apply_overrides(RunConfig(), ["network.architecture=mt_sac", *overrides]))
    actor, critic = builders.make_actor_critic(config, env, 1)
    return builders.make_loss(config, actor, critic, 1)[0]


def test_config_options_reach_the_loss():
    """Pendulum: one action dimension; alpha capped at 1; gamma 0.99."""
    assert pendulum_loss([]).td_target_bound is None and pendulum_loss([]).reward_normalization is None
    loss = pendulum_loss(["env.reward_scale=1.0", "loss.clip_td_target=true"])
    assert loss.td_target_bound == pytest.approx((10.0 + math.log(2)) / 0.01)
    loss = pendulum_loss(["env.reward_scale=1.0", "loss.clip_td_target=true", "loss.reward_normalization=true"])
    assert loss.td_target_bound == pytest.approx((1.0 + math.log(2)) / 0.01)
    assert loss.reward_normalization.floor == 1.0
    assert loss.reward_scale == 0.1  # the extreme-task threshold follows the normalised rewards
    critic = pendulum_loss(["network.critic_layer_norm=true"]).qvalue_network
    assert any(isinstance(m, torch.nn.LayerNorm) for m in critic.modules())
    head = pendulum_loss(["network.critic_value_bins=51"]).qvalue_network.value_head
    assert head.num_bins == 51 and head.edges[-1].item() == pytest.approx((1.0 + math.log(2)) / 0.01)
    assert head.edges[0].item() == pytest.approx(-(1.0 + math.log(2)) / 0.01)
    with pytest.raises(ConfigError, match="loss.clip_td_target=True needs loss.max_log_alpha"):
        pendulum_loss(["loss.clip_td_target=true", "loss.max_log_alpha=none"])
    with pytest.raises(ConfigError, match="network.critic_value_bins=1 must be >= 2"):
        pendulum_loss(["network.critic_value_bins=1"])


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def hl_gauss_by_hand(y: float, edges: list[float], sigma: float) -> list[float]:
    y = min(max(y, edges[0]), edges[-1])
    cdf = [normal_cdf((e - y) / sigma) for e in edges]
    return [(b - a) / (cdf[-1] - cdf[0]) for a, b in zip(cdf[:-1], cdf[1:])]


def test_hl_gauss_head_hand_worked():
    head = HLGaussValue(-1.0, 1.0, 2)  # edges -1, 0, 1; sigma 0.75
    probs = head.target_probs(torch.tensor([0.0, 0.5, 5.0]))
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(probs[1], torch.tensor([0.31699, 0.68301]), atol=1e-5, rtol=0)  # worked on paper
    torch.testing.assert_close(probs[2], torch.tensor(hl_gauss_by_hand(1.0, [-1.0, 0.0, 1.0], 0.75)))  # clamped to 1
    torch.testing.assert_close(head.value(torch.tensor([0.0, math.log(3.0)])), torch.tensor([0.25]))  # 0.25(-0.5) + 0.75(0.5)
    with pytest.raises(ValueError, match="num_bins >= 2"):
        HLGaussValue(-1.0, 1.0, 1)


def test_categorical_critic_loss_is_the_cross_entropy_against_hl_gauss_targets():
    """Terminal transitions (``y = r``), equal tasks: the critic loss is the mean over samples of
    ``sum_k -sum_j p_j(r) log softmax(logits_k)_j``, with ``p`` worked out from the normal CDF."""
    torch.manual_seed(0)
    spec = Bounded(-1.0, 1.0, (ACT,))
    actor = make_actor("mt_sac", OBS, spec, TASKS, **TINY["mt_sac"])
    head = HLGaussValue(-2.0, 2.0, 8)
    critic = make_critic("mt_sac", OBS, ACT, TASKS, value_head=head, **TINY["mt_sac"])
    loss = MultiTaskSACLoss(actor, critic, num_tasks=TASKS)
    loss.make_value_estimator(gamma=0.9)
    batch = random_transitions(actor, TASKS, 6, OBS, generator=torch.Generator().manual_seed(2))
    batch["next", "terminated"].fill_(True)
    batch["next", "reward"] = torch.tensor([[-3.0], [-1.0], [0.0], [0.3], [1.2], [2.5]])
    out = loss(batch.clone())
    edges, sigma = head.edges.tolist(), 0.75 * 4.0 / 8
    expected = 0.0
    for member in loss.qvalue_network_params.unbind(0):
        with member.to_module(critic), torch.no_grad():
            logits = critic(batch.select("observation", "action", "task_id").clone())["state_action_value_logits"]
        for row, reward in zip(torch.log_softmax(logits, -1).tolist(), batch["next", "reward"].flatten().tolist()):
            expected -= sum(p * lp for p, lp in zip(hl_gauss_by_hand(reward, edges, sigma), row))
    torch.testing.assert_close(out["loss_qvalue"], torch.tensor(expected / 6), rtol=1e-5, atol=1e-6)
    out["loss_qvalue"].backward()  # gradients reach the critic's logits layer
    assert loss.qvalue_network_params["network", "head", "weight"].grad.abs().sum() > 0


def test_extreme_task_rule_measures_the_squared_td_error_of_a_categorical_critic():
    """Terminal transitions, targets of +-90 inside the support +-100, an untrained critic
    (expected ``Q`` near 0): the squared TD errors (about 2 x 90^2 per sample) are far above
    ``tau = 1000`` while the cross-entropy is a few nats; the task is flagged and
    ``task_loss`` is ``mean[sum_k (Q_k - y)^2]`` up to the small policy and temperature terms."""
    torch.manual_seed(0)
    spec = Bounded(-1.0, 1.0, (ACT,))
    actor = make_actor("mt_sac", OBS, spec, TASKS, **TINY["mt_sac"])
    critic = make_critic("mt_sac", OBS, ACT, TASKS, value_head=HLGaussValue(-100.0, 100.0, 8), **TINY["mt_sac"])
    loss = MultiTaskSACLoss(actor, critic, num_tasks=TASKS, loss_balancing=False, extreme_loss_threshold=1000.0)
    loss.make_value_estimator(gamma=0.9)
    batch = random_transitions(actor, TASKS, 6, OBS, generator=torch.Generator().manual_seed(2))
    batch["next", "terminated"].fill_(True)
    batch["next", "reward"] = torch.tensor([[90.0], [-90.0]]).repeat(3, 1)
    out = loss(batch.clone())
    squared = torch.zeros(6)
    for member in loss.qvalue_network_params.unbind(0):
        with member.to_module(critic), torch.no_grad():
            q = critic(batch.select("observation", "action", "task_id").clone())["state_action_value"].flatten()
        squared += (q - batch["next", "reward"].flatten()) ** 2
    by_task = torch.stack([squared[batch["task_id"].flatten() == t].mean() for t in range(TASKS)])
    assert out["loss_qvalue"] < 10 and (by_task > 10_000).all()
    torch.testing.assert_close(out["task_loss"], by_task, rtol=1e-3, atol=0)
    assert out["task_masked"].all()
    torch.testing.assert_close(out["task_scale"], 1000.0 / out["task_loss"])
