"""The trainer's evaluation against Meta-World's own protocol run on the package's own envs."""
from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from metaworld.evaluation import evaluation
from metaworld.policies import ENV_POLICY_MAP
from tensordict.nn import TensorDictModule
from torchrl.data import Bounded

from d2r_torchrl.modules import make_actor
from d2r_torchrl.training.evaluation import MetaWorldAgent, evaluate, make_eval_envs

# With 60-step episodes the scripted policies solve some goals and not others
# (seed 3: reach-v3 8/10, push-v3 3/10), so equal rates mean the same goals were played.
TASKS = ("reach-v3", "push-v3")
SEED, EPISODE, EPISODES = 3, 60, 10


def scripted_actions(task_names, observations: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Constant(s) may be too high", harmless
        return np.stack([ENV_POLICY_MAP[name]().get_action(obs) for name, obs in zip(task_names, observations)])


class ScriptedAgent:
    """A plain ``metaworld.evaluation.Agent``: sub-env ``i`` runs task ``TASKS[i]``; it sees
    the observations in float32, as a TorchRL policy does."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return scripted_actions(TASKS, observations.astype(np.float32))

    def reset(self, env_mask: np.ndarray) -> None:
        pass


def scripted_policy() -> TensorDictModule:
    """The same scripted policies as a TorchRL module that picks them by ``task_id``."""

    def act(observation: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        names = [TASKS[i] for i in task_id.tolist()]
        return torch.from_numpy(scripted_actions(names, observation.numpy())).float()

    return TensorDictModule(act, in_keys=["observation", "task_id"], out_keys=["action"])


@pytest.mark.parametrize("goals", ["random", "fixed"])
def test_evaluate_equals_metaworld_protocol_on_the_package_envs(goals: str) -> None:
    """Same policy, same goals, same success and returns as ``metaworld.evaluation`` on the
    package's ``custom-mt-envs`` (which seeds task ``i`` with ``seed + i``, as we do);
    with fixed goals every episode of a task replays one goal."""
    ours = evaluate(scripted_policy(), make_eval_envs(TASKS, goals=goals, seed=SEED, max_episode_steps=EPISODE), TASKS, EPISODES)
    package_envs = gym.make_vec(
        "Meta-World/custom-mt-envs", vector_strategy="sync", envs_list=list(TASKS), seed=SEED, max_episode_steps=EPISODE
    )
    if goals == "fixed":  # the package has no fixed-goal mode: draw once, then keep it
        package_envs.reset()
        package_envs.call("toggle_sample_tasks_on_reset", False)
    _, _, success, returns = evaluation(ScriptedAgent(), package_envs, num_episodes=EPISODES)
    expected_success = torch.tensor([success[name] for name in TASKS], dtype=torch.float32)
    expected_return = torch.tensor([np.mean(returns[name]) for name in TASKS], dtype=torch.float32)
    torch.testing.assert_close(ours.success, expected_success)
    torch.testing.assert_close(ours.episode_return, expected_return)
    if goals == "random":
        assert ours.success.tolist() == pytest.approx([0.8, 0.3])
    else:
        assert set(ours.success.tolist()) <= {0.0, 1.0}  # one goal: all episodes alike


def test_agent_acts_deterministically_with_each_sub_envs_task_id() -> None:
    """A stochastic TorchRL actor acts with its mean (tanh of ``loc``) and reads the task id
    of each sub-env."""
    torch.manual_seed(0)
    actor = make_actor("mt_sac", 39, Bounded(-1.0, 1.0, (4,)), 2, hidden_widths=(16,))
    observations = np.random.default_rng(0).normal(size=(2, 39))
    agent = MetaWorldAgent(actor, [0, 1])
    first, second = agent.eval_action(observations), agent.eval_action(observations)
    np.testing.assert_array_equal(first, second)
    network = actor.module[0].network
    with torch.no_grad():
        obs = torch.as_tensor(observations, dtype=torch.float32)
        loc = [network(obs[i : i + 1], torch.tensor([i]))[0, :4] for i in range(2)]
    np.testing.assert_allclose(first, torch.tanh(torch.stack(loc)).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="3 envs for 2 task ids"):
        agent.eval_action(np.zeros((3, 39)))
