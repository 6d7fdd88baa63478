"""The public builders refuse arguments out of range with one line naming the argument."""
import pytest
import torch
from torchrl.data import Bounded

from d2r_torchrl.envs.metaworld import make_env
from d2r_torchrl.modules.actor_critic import make_actor, make_critic, make_network, parameter_count
from d2r_torchrl.modules.baselines import MultiTaskMLP, SoftModularNetwork
from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss

SPEC = Bounded(-torch.ones(4), torch.ones(4), shape=(4,))
SMALL = dict(num_modules=3, module_width=8, encoder_widths=(16, 16), router_widths=(16,))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: make_actor("d2r", 0, SPEC, 2, **SMALL), "observation_dim must be a positive integer, got 0."),
        (lambda: make_actor("mt_sac", 39, SPEC, 0), "num_tasks must be a positive integer, got 0."),
        (lambda: make_critic("d2r", 39, 0, 2, **SMALL), "action_dim must be a positive integer, got 0."),
        (lambda: make_network("mh_sac", 39, 2, -1), "out_features must be a positive integer, got -1."),
        (lambda: make_network("soft_modular", 2.5, 2, 1), "in_features must be a positive integer, got 2.5."),
        (lambda: D2RNetwork(39, 2, 1, **{**SMALL, "module_width": 0}), "module_width must be a positive integer, got 0."),
        (lambda: D2RNetwork(39, 2, 1, **{**SMALL, "top_k": 0}), "top_k must be a positive integer, got 0."),
        (lambda: D2RNetwork(39, 2, 1, **{**SMALL, "top_k": 4}), "top_k must be in [1, num_modules=3], got 4."),
        (lambda: D2RNetwork(39, 2, 1, **{**SMALL, "encoder_widths": ()}), "encoder_widths must be a non-empty sequence"),
        (lambda: D2RNetwork(39, 2, 1, **{**SMALL, "router_widths": (16, 0)}), "router_widths must be a non-empty sequence"),
        (lambda: MultiTaskMLP(39, 2, 1, hidden_widths=(0,)), "hidden_widths must be a non-empty sequence"),
        (lambda: SoftModularNetwork(39, 2, 1, module_width=-8), "module_width must be a positive integer, got -8."),
    ],
)
def test_network_builders_refuse_sizes_out_of_range(build, message):
    with pytest.raises(ValueError, match=f"^{message.replace('[', '.').replace(']', '.').replace('(', '.').replace(')', '.')}"):
        build()


@pytest.mark.parametrize(
    "argument,value,accepted",
    [
        ("alpha_init", float("nan"), "a finite positive number"),
        ("alpha_init", float("inf"), "a finite positive number"),
        ("max_alpha", float("nan"), "a finite positive number or None"),
        ("min_alpha", -1.0, "a finite positive number or None"),
        ("target_entropy", float("inf"), "a finite number"),
        ("extreme_loss_threshold", -1.0, "a finite positive number or None"),
        ("extreme_loss_threshold", float("nan"), "a finite positive number or None"),
        ("reward_scale", float("inf"), "a finite positive number"),
        ("num_tasks", 0, "a positive integer"),
    ],
)
def test_the_loss_refuses_numbers_out_of_range(argument, value, accepted):
    actor = make_actor("mt_sac", 39, SPEC, 2)
    critic = make_critic("mt_sac", 39, 4, 2)
    kwargs = {"num_tasks": 2, argument: value}
    with pytest.raises(ValueError, match=f"^{argument} must be {accepted}, got {value!r}"):
        MultiTaskSACLoss(actor, critic, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(seed=-1), r"seed must be an integer in \[0, 4294967294\], got -1"),
        (dict(seed=2**32 - 1), r"seed must be an integer in \[0, 4294967294\]"),  # task 1 would get 2**32
        (dict(reward_scale=float("nan")), "reward_scale must be a finite positive number, got nan"),
        (dict(first_task_id=-3), "first_task_id must be an integer >= 0, got -3"),
    ],
)
def test_make_env_refuses_arguments_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env("reach-v3,push-v3", **kwargs)


@pytest.mark.parametrize("sizes", [SMALL, dict(num_modules=1, module_width=5, top_k=1), {}])
def test_parameter_count_matches_the_built_network(sizes):
    built = D2RNetwork(43, 3, 1, **sizes)
    assert parameter_count("d2r", 43, 3, 1, **sizes) == sum(p.numel() for p in built.parameters())
    assert parameter_count("soft_modular", 43, 3, 1, preset="deep") == sum(
        p.numel() for p in make_network("soft_modular", 43, 3, 1, preset="deep").parameters()
    )
