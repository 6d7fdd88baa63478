"""The policy's log-probability forms against hand-worked values, and the scale floor."""
import math

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.modules import TanhNormal
from torchrl.objectives.sac import compute_rsample_log_prob

from d2r_torchrl.modules.actor_critic import SCALE_MIN, make_actor
from d2r_torchrl.modules.distributions import ReferenceTanhNormal
from d2r_torchrl.training import builders
from d2r_torchrl.training.config import ConfigError, RunConfig, apply_overrides, validate

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def exact_correction(z: float) -> float:
    """``log(1 - tanh(z)^2) = -2 log cosh(z)``."""
    return -2.0 * math.log(math.cosh(z))


def reference_correction(z: float) -> float:
    return math.log(1.0 - math.tanh(z) ** 2 + 1e-6)


def normal_log_density(z: float, mu: float, sigma: float) -> float:
    return -0.5 * ((z - mu) / sigma) ** 2 - math.log(sigma) - LOG_SQRT_2PI


def drawn_noise(seed: int, shape, dtype) -> torch.Tensor:
    """The standard-normal draw a Normal's ``rsample`` makes after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.distributions.Normal(torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype)).rsample()


def test_corrections_hand_worked():
    """The figures quoted for the two forms: 18.6 against 13.8 nats at z = 10, 98.6 against 13.8 at 50."""
    assert round(-exact_correction(10.0), 1) == 18.6 and round(-reference_correction(10.0), 1) == 13.8
    assert round(-exact_correction(50.0), 1) == 98.6 and round(-reference_correction(50.0), 1) == 13.8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("z", [0.0, 1.0, 10.0, 50.0])
def test_rsample_log_prob_scores_the_pre_tanh_draw(z, dtype):
    """Both forms against ``sum_d [log N(z_d) - correction(z_d)]`` at and away from saturation,
    scoring the drawn ``z`` (an ``atanh`` of the rounded action would give ``z`` of at most ~7
    in float32). The loss draws through ``compute_rsample_log_prob``."""
    loc = torch.tensor([z, -z, 0.5 * z], dtype=dtype)
    scale = torch.tensor([0.1, 0.3, 1.0], dtype=dtype)
    noise = drawn_noise(3, loc.shape, dtype)
    pre_tanh = (loc + scale * noise).tolist()
    normal = sum(normal_log_density(x, m, s) for x, m, s in zip(pre_tanh, loc.tolist(), scale.tolist()))
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-3)
    for cls, correction in ((ReferenceTanhNormal, reference_correction), (TanhNormal, exact_correction)):
        torch.manual_seed(3)
        action, log_prob = compute_rsample_log_prob(cls(loc, scale))
        expected = normal - sum(correction(x) for x in pre_tanh)
        torch.testing.assert_close(log_prob, torch.tensor(expected, dtype=dtype), **tolerance, msg=cls.__name__)
        torch.testing.assert_close(action, torch.tanh(torch.tensor(pre_tanh, dtype=dtype)), **tolerance)


def test_log_prob_of_a_given_action_is_finite_at_the_bounds():
    dist = ReferenceTanhNormal(torch.zeros(2), torch.full((2,), 0.5))
    action = torch.tensor([1.0, -1.0])
    log_prob = dist.log_prob(action)
    assert torch.isfinite(log_prob)
    # the pre-image TorchRL recovers for |a| = 1: its clamped atanh
    pre_tanh = dist.transforms[0].inv(action).tolist()
    expected = sum(normal_log_density(x, 0.0, 0.5) - reference_correction(x) for x in pre_tanh)
    torch.testing.assert_close(log_prob, torch.tensor(expected), rtol=1e-4, atol=1e-3)


def test_affine_box_adds_log_half_width_as_torchrl():
    """On ``[-2, 2]`` both forms subtract ``log 2`` per dimension; away from saturation the
    reference form equals TorchRL's exact one up to its 1e-6."""
    loc, scale = torch.tensor([0.3, -0.4], dtype=torch.float64), torch.tensor([0.5, 0.2], dtype=torch.float64)
    box = dict(low=torch.full((2,), -2.0, dtype=torch.float64), high=torch.full((2,), 2.0, dtype=torch.float64))
    action = torch.tensor([0.7, -1.1], dtype=torch.float64)
    wide = ReferenceTanhNormal(loc, scale, **box).log_prob(action)
    torch.testing.assert_close(wide, TanhNormal(loc, scale, **box).log_prob(action), rtol=0, atol=1e-5)
    unit = ReferenceTanhNormal(loc, scale).log_prob(action / 2)
    torch.testing.assert_close(wide, unit - 2 * math.log(2.0))


def test_make_actor_selects_the_form_and_rejects_unknown_ones():
    spec = Bounded(-1.0, 1.0, (2,))
    batch = TensorDict(observation=torch.randn(4, 3), task_id=torch.zeros(4, dtype=torch.long), batch_size=[4])
    for form, cls in (("exact", TanhNormal), ("reference", ReferenceTanhNormal)):
        actor = make_actor("mt_sac", 3, spec, 1, log_prob=form, hidden_widths=(8,))
        assert type(actor.get_dist(batch.clone())) is cls
    with pytest.raises(ValueError, match="log_prob 'authors'.*accepted: \\['exact', 'reference'\\]"):
        make_actor("mt_sac", 3, spec, 1, log_prob="authors")


def test_config_field_reaches_the_actor():
    env = gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")])
    config = apply_overrides(RunConfig(), ["network.architecture=mt_sac", "network.log_prob=reference"])
    actor, _ = builders.make_actor_critic(config, env, 1)
    assert actor.module[-1].distribution_class is ReferenceTanhNormal
    with pytest.raises(ConfigError, match="network.log_prob='authors' is not accepted"):
        validate(apply_overrides(RunConfig(), ["network.log_prob=authors"]))


def test_policy_scale_floor_is_torchrl_smallest_scale():
    """A log-std far below the floor gives the smallest scale TorchRL's TanhNormal declares valid
    (the reference's floor of -20 would give 2e-9, which it rejects)."""
    spec = Bounded(-1.0, 1.0, (2,))
    actor = make_actor("mt_sac", 3, spec, 1, hidden_widths=(8,))
    head = actor.module[0].network.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, -50.0, 5.0]))  # loc, loc, log-std, log-std
    batch = TensorDict(observation=torch.randn(4, 3), task_id=torch.zeros(4, dtype=torch.long), batch_size=[4])
    scale = actor.module[0](batch)["scale"]
    constraint = TanhNormal.arg_constraints["scale"]
    assert constraint.check(scale).all()
    assert (scale[:, 0] == SCALE_MIN).all() and 1e-6 < SCALE_MIN < 1.000001e-6
    torch.testing.assert_close(scale[:, 1], torch.full((4,), math.exp(2.0)))
    assert not constraint.check(torch.tensor(math.exp(-20.0)))
