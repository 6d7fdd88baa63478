"""MultiTaskSACLoss against TorchRL's SACLoss, hand-computed weights and routing semantics."""
import math
import warnings

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import SACLoss, SoftUpdate

from d2r_torchrl.modules.actor_critic import ROUTE_KEY, make_actor, make_critic
from d2r_torchrl.objectives import MultiTaskSACLoss, per_task_mean
from d2r_torchrl.objectives.multitask_sac import weights_averaging_one_per_task

OBS, ACT = 5, 2
SMALL_D2R = dict(num_modules=4, module_width=16, encoder_widths=(32, 32), router_widths=(32, 32))
SMALL_MLP = dict(hidden_widths=(32, 32))


def make_pair(architecture: str, num_tasks: int, **kwargs):
    spec = Bounded(-1.0, 1.0, (ACT,))
    small = SMALL_D2R if architecture == "d2r" else SMALL_MLP
    return (
        make_actor(architecture, OBS, spec, num_tasks, **small),
        make_critic(architecture, OBS, ACT, num_tasks, **small),
    )


def make_batch(actor, num_tasks: int, per_task: int = 8, reward_scale: float = 1.0) -> TensorDict:
    size = num_tasks * per_task
    task_id = torch.arange(size) % num_tasks
    batch = TensorDict(observation=torch.randn(size, OBS), task_id=task_id, batch_size=[size])
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        actor(batch)
    batch["next"] = TensorDict(
        observation=torch.randn(size, OBS),
        task_id=task_id,
        reward=reward_scale * torch.randn(size, 1),
        done=torch.zeros(size, 1, dtype=torch.bool),
        terminated=torch.zeros(size, 1, dtype=torch.bool),
        batch_size=[size],
    )
    return batch


def make_loss(actor, critic, num_tasks, **kwargs) -> MultiTaskSACLoss:
    loss = MultiTaskSACLoss(actor, critic, num_tasks=num_tasks, **kwargs)
    loss.make_value_estimator(gamma=0.9)
    return loss


def test_single_task_matches_torchrl_sac_loss():
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 1)
    ours = make_loss(actor, critic, 1, loss_balancing=False)
    reference = SACLoss(actor, critic, num_qvalue_nets=2, loss_function="l2")
    reference.make_value_estimator(gamma=0.9)
    ours.qvalue_network_params.data.copy_(reference.qvalue_network_params.data)
    ours.target_qvalue_network_params.data.copy_(reference.target_qvalue_network_params.data)
    batch = make_batch(actor, 1, per_task=32)
    ours.make_value_estimator(gamma=0.9)

    def losses_and_gradients(loss):
        """The three losses and the gradient of their sum w.r.t. actor, critics and alpha."""
        torch.manual_seed(1)
        out = loss(batch.clone())
        params = [*loss.actor_network_params.values(True, True), *loss.qvalue_network_params.values(True, True), loss.log_alpha]
        total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return out, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    expected, expected_grads = losses_and_gradients(reference)
    got, got_grads = losses_and_gradients(ours)
    for key in ("loss_actor", "loss_qvalue", "loss_alpha"):
        torch.testing.assert_close(got[key], expected[key], msg=key)
    assert any(g.abs().max() > 0 for g in expected_grads)
    for got_grad, expected_grad in zip(got_grads, expected_grads):  # same gradient paths, not only values
        torch.testing.assert_close(got_grad.reshape(expected_grad.shape), expected_grad)  # log alpha: [T] vs []


def test_per_task_mean_hand_computed():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    task_id = torch.tensor([0, 0, 0, 2])
    means, counts = per_task_mean(values, task_id, 3, weights=torch.tensor([1.0, 1.0, 2.0, 0.5]))
    torch.testing.assert_close(means, torch.tensor([(1 + 2 + 6) / 3, 0.0, 5.0]))
    torch.testing.assert_close(counts, torch.tensor([3.0, 0.0, 1.0]))


def test_balancing_weights_hand_computed():
    actor, critic = make_pair("mt_sac", 3)
    loss = make_loss(actor, critic, 3)
    with torch.no_grad():
        loss.log_alpha.copy_(torch.tensor([0.0, math.log(2.0), math.log(4.0)]))
    inverse = torch.tensor([1.0, 0.5, 0.25])
    torch.testing.assert_close(loss.balancing_weights(), 3 * inverse / inverse.sum())
    assert torch.equal(make_loss(actor, critic, 3, loss_balancing=False).balancing_weights(), torch.ones(3))


def _extreme_batch(actor):
    """Three tasks; task 1's rewards (500) put its critic loss far above 3000."""
    batch = make_batch(actor, 3)
    batch["next", "reward"][batch["task_id"] == 1] = 500.0
    return batch


@pytest.mark.parametrize("rule", ["reference", "clip"])
def test_extreme_task_is_dropped_or_clipped_and_others_kept(rule):
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 3)
    batch = _extreme_batch(actor)
    torch.manual_seed(2)
    unmasked = make_loss(actor, critic, 3, extreme_loss_threshold=None)(batch.clone())
    torch.manual_seed(2)
    masked = make_loss(actor, critic, 3, extreme_loss_threshold=3000.0, extreme_loss_rule=rule)(batch.clone())
    task_loss = unmasked["task_loss"]
    assert task_loss[1] > 3000 and (task_loss[[0, 2]] < 3000).all()
    assert masked["task_masked"].tolist() == [False, True, False]
    # reference: task 1 contributes nothing; clip: exactly the threshold
    contribution = 0.0 if rule == "reference" else 3000.0
    torch.testing.assert_close(masked["task_scale"], torch.tensor([1.0, contribution / task_loss[1], 1.0]))
    total = masked["loss_actor"] + masked["loss_qvalue"] + masked["loss_alpha"]
    torch.testing.assert_close(total, (task_loss[[0, 2]].sum() + contribution) / 3)
    unmasked_total = unmasked["loss_actor"] + unmasked["loss_qvalue"] + unmasked["loss_alpha"]
    torch.testing.assert_close(unmasked_total, task_loss.sum() / 3)
    assert not unmasked["task_masked"].any() and torch.equal(unmasked["task_scale"], torch.ones(3))


def test_clip_threshold_scales_with_reward_scale_squared_and_reference_does_not():
    actor, critic = make_pair("mt_sac", 1)
    thresholds = {
        (rule, scale): make_loss(actor, critic, 1, extreme_loss_rule=rule, reward_scale=scale).extreme_task_threshold()
        for rule in ("clip", "reference")
        for scale in (0.1, 1.0, 0.5)
    }
    assert thresholds[("clip", 0.1)] == pytest.approx(3000.0)
    assert thresholds[("clip", 1.0)] == pytest.approx(300_000.0)  # (1.0 / 0.1)^2 = 100
    assert thresholds[("clip", 0.5)] == pytest.approx(75_000.0)  # (0.5 / 0.1)^2 = 25
    assert {thresholds[("reference", s)] for s in (0.1, 1.0, 0.5)} == {3000.0}
    with pytest.raises(ValueError, match="accepted"):
        make_loss(actor, critic, 1, extreme_loss_rule="sometimes")


def test_masked_task_recovers_under_clip_and_stays_frozen_under_reference():
    """Task 1's loss starts far above the threshold (terminal reward 100, Q near 0: about
    20,000). Under the default rule it is scaled, keeps learning and falls back under the
    threshold; under the reference rule it gets no gradient and stays masked at every
    update while task 0 (reward 0) keeps training."""
    results = {}
    for rule, updates in (("clip", 150), ("reference", 60)):
        torch.manual_seed(0)
        actor, critic = make_pair("mt_sac", 2)
        loss = make_loss(actor, critic, 2, extreme_loss_rule=rule)
        optim = torch.optim.Adam(loss.parameters(), lr=3e-3)
        masked, task_losses = [], []
        for _ in range(updates):
            batch = make_batch(actor, 2, per_task=32)
            batch["next", "reward"] = 100.0 * (batch["task_id"] == 1).float().unsqueeze(-1)
            batch["next", "terminated"][:] = True
            out = loss(batch)
            optim.zero_grad()
            (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).backward()
            optim.step()
            loss.after_update()
            masked.append(out["task_masked"])
            task_losses.append(out["task_loss"])
        results[rule] = torch.stack(masked), torch.stack(task_losses)
    masked, task_loss = results["clip"]
    assert masked[0].tolist() == [False, True] and task_loss[0, 1] > 5 * 3000
    assert not masked[-40:, 1].any() and (task_loss[-40:, 1] < 3000).all()
    masked, task_loss = results["reference"]
    assert masked[:, 1].all() and (task_loss[:, 1] > 5 * 3000).all()
    assert not masked[:, 0].any()


def test_alpha_gradient_zero_for_absent_task_and_cap_holds():
    torch.manual_seed(0)
    actor, critic = make_pair("d2r", 3)
    loss = make_loss(actor, critic, 3)
    batch = make_batch(actor, 3)
    batch = batch[batch["task_id"] != 2]
    out = loss(batch)
    out["loss_alpha"].backward()
    grad = loss.log_alpha.grad
    assert grad[2] == 0 and (grad[:2] != 0).all()
    with torch.no_grad():
        loss.log_alpha.copy_(torch.tensor([0.5, -0.3, 2.0]))
    loss.after_update()
    torch.testing.assert_close(loss.log_alpha.detach(), torch.tensor([0.0, -0.3, 0.0]))


def test_route_temperature_refreshed_everywhere():
    actor, critic = make_pair("d2r", 3)
    loss = make_loss(actor, critic, 3)
    with torch.no_grad():
        loss.log_alpha.copy_(torch.tensor([0.0, -1.0, -2.0]))
    loss.after_update()
    inverse = torch.exp(torch.tensor([0.0, 1.0, 2.0]))
    expected = 3 * inverse / inverse.sum()
    torch.testing.assert_close(actor.module[0].network.route_temperature, expected)
    for params in (loss.qvalue_network_params, loss.target_qvalue_network_params):
        temperatures = [v for k, v in params.items(True, True) if k[-1] == "route_temperature"]
        assert len(temperatures) == 1
        torch.testing.assert_close(temperatures[0], expected.expand(2, 3))


def test_construction_does_not_warn_of_a_missing_target_updater():
    """TorchRL warns when target parameters are read before an updater is attached; building
    the loss (which sets the target critics' routing temperature) must not trigger it."""
    actor, critic = make_pair("d2r", 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = make_loss(actor, critic, 3)
    assert not [w for w in caught if "target network updater" in str(w.message)]
    SoftUpdate(loss, tau=0.005)
    with torch.no_grad():
        loss.log_alpha.fill_(-1.0)
    loss.after_update()
    target = [v for k, v in loss.target_qvalue_network_params.items(True, True) if k[-1] == "route_temperature"]
    torch.testing.assert_close(target[0], torch.ones(2, 3))


def test_q_max_is_each_tasks_largest_absolute_q_over_both_critics():
    """Against the two critics run one by one and a loop over samples; task 1, absent from
    the batch, gets NaN."""
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 3)
    loss = make_loss(actor, critic, 3)
    batch = make_batch(actor, 3, per_task=4)
    batch = batch[batch["task_id"] != 1]
    q_max = loss(batch)["task_q_max"]
    with torch.no_grad():
        q = []
        for params in loss.qvalue_network_params.unbind(0):
            with params.to_module(critic):
                q.append(critic(batch.copy())["state_action_value"].flatten())
    for task in (0, 2):
        expected = max(abs(float(q_k[i])) for q_k in q for i in range(len(batch)) if batch["task_id"][i] == task)
        assert float(q_max[task]) == pytest.approx(expected, rel=1e-6)
    assert q_max[1].isnan()


def test_policy_term_reads_stored_route_and_critic_terms_do_not():
    torch.manual_seed(0)
    actor, critic = make_pair("d2r", 2)
    loss = make_loss(actor, critic, 2)
    batch = make_batch(actor, 2)
    torch.manual_seed(3)
    base = loss(batch.clone())
    altered = batch.clone()
    altered[ROUTE_KEY] = make_batch(actor, 2)[ROUTE_KEY]
    assert not torch.equal(altered[ROUTE_KEY], batch[ROUTE_KEY])
    torch.manual_seed(3)
    changed = loss(altered)
    assert not torch.allclose(changed["loss_actor"], base["loss_actor"])
    torch.testing.assert_close(changed["loss_qvalue"], base["loss_qvalue"])


def test_missing_keys_raise_clear_errors():
    actor, critic = make_pair("d2r", 2)
    loss = make_loss(actor, critic, 2)
    batch = make_batch(actor, 2)
    with pytest.raises(KeyError, match="task_id"):
        loss(batch.exclude("task_id"))
    with pytest.raises(KeyError, match="behaviour route"):
        loss(batch.exclude(ROUTE_KEY))
    bad = batch.clone()
    bad["task_id"][0] = 7
    with pytest.raises(ValueError, match="out of range"):
        loss(bad)


def test_weights_averaging_one_per_task_hand_computed():
    task_id = torch.tensor([0, 0, 0, 2, 1])
    got = weights_averaging_one_per_task(torch.tensor([1.0, 1.0, 2.0, 0.5, 0.0]), task_id, 3)
    torch.testing.assert_close(got, torch.tensor([0.75, 0.75, 1.5, 1.0, 0.0]))  # task 0's mean is 4/3
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and non-negative"):
            weights_averaging_one_per_task(torch.tensor([1.0, bad, 1.0, 1.0, 1.0]), task_id, 3)


def test_priority_weights_enter_each_task_self_normalised_and_td_error():
    """Each task's terms are ``sum_i p_i x_i / sum_i p_i``: a factor on one task's weights (PER's
    max-normalisation gives each task its own) changes nothing, and unequal weights give the
    weighted mean of the unweighted per-sample losses (``reduction="none"``)."""
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 2)
    batch = make_batch(actor, 2)
    task = batch["task_id"].reshape(-1)

    def run(reduction, weights=None):
        data = batch.clone()
        if weights is not None:
            data["priority_weight"] = weights
        torch.manual_seed(4)
        return make_loss(actor, critic, 2, reduction=reduction)(data), data

    plain, _ = run("mean")
    rescaled, data = run("mean", torch.where(task == 0, 0.01, 3.0))
    for key in ("loss_actor", "loss_qvalue", "loss_alpha", "task_loss"):
        torch.testing.assert_close(rescaled[key], plain[key])
    assert data["td_error"].shape == batch.shape and (data["td_error"] >= 0).all()

    weights = torch.rand(batch.shape[0]) + 0.1
    weighted, _ = run("mean", weights)
    per_sample, _ = run("none")  # sample i of task t: B x_i / (P n_t) (balancing weights start at 1)
    counts = torch.bincount(task, minlength=2).float()
    x = per_sample["loss_qvalue"] * counts[task] * 2 / batch.shape[0]  # back to x_i
    expected = sum((weights * x)[task == t].sum() / weights[task == t].sum() for t in range(2)) / 2
    torch.testing.assert_close(weighted["loss_qvalue"], expected)


def test_time_limit_terminal_option_stops_bootstrap_on_truncation():
    torch.manual_seed(0)
    actor, critic = make_pair("mt_sac", 1)
    batch = make_batch(actor, 1)
    batch["next", "done"][:] = True  # time limit: done and truncated, not terminated
    results = {}
    for terminal in (False, True):
        loss = make_loss(actor, critic, 1, time_limit_terminal=terminal)
        torch.manual_seed(5)
        results[terminal] = loss(batch.clone())["loss_qvalue"]
    assert not torch.allclose(results[False], results[True])


def test_tiny_multitask_problem_learns():
    """Two bandit tasks whose best action differs: critic loss falls, alphas fall."""
    torch.manual_seed(0)
    actor, critic = make_pair("d2r", 2)
    loss = make_loss(actor, critic, 2)
    optim = torch.optim.Adam(loss.parameters(), lr=3e-3)
    updater = SoftUpdate(loss, tau=0.05)
    targets = torch.tensor([0.5, -0.5])
    critic_losses = []
    for _ in range(150):
        batch = make_batch(actor, 2, per_task=32)
        action = batch["action"]
        batch["next", "reward"] = -(action[:, :1] - targets[batch["task_id"]].unsqueeze(-1)) ** 2
        batch["next", "terminated"][:] = True
        batch["next", "done"][:] = True
        out = loss(batch)
        optim.zero_grad()
        (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).backward()
        optim.step()
        updater.step()
        loss.after_update()
        critic_losses.append(float(out["loss_qvalue"]))
    assert sum(critic_losses[-20:]) / 20 < 0.5 * sum(critic_losses[:20]) / 20
    assert (loss.log_alpha.detach() < 0).all()
