"""Meta-World's own evaluation protocol (``metaworld.evaluation.evaluation``) for a TorchRL policy.

The protocol: ``episodes_per_task`` episodes of every task, each on a goal drawn from the
task's pre-sampled goals at reset (random goals; with fixed goals the task's one goal),
deterministic actions, episodes end at success, so an episode succeeds when
``info["success"]`` is set at any step. The package runs it on a gymnasium vector env of
one env per task; :func:`make_eval_envs` builds that env from the same seeds as the
training env (so the same pre-sampled goals, and the same goal when goals are fixed) and
:class:`MetaWorldAgent` lets the package drive a TorchRL policy.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import gymnasium as gym
import numpy as np
import torch
from metaworld.evaluation import evaluation
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.envs.metaworld import make_gym_task_env


class EvaluationResult(NamedTuple):
    """Per-task means over the evaluation episodes, each ``[T]``: success rate and
    undiscounted return in Meta-World's reward units (no reward scale)."""

    success: torch.Tensor
    episode_return: torch.Tensor


class MetaWorldAgent:
    """``metaworld.evaluation.Agent`` around a TorchRL policy.

    ``eval_action(observations [T, 39])`` runs the policy on ``observation`` (float32) and
    ``task_id`` (sub-env ``i`` is task ``task_ids[i]``) under
    ``ExplorationType.DETERMINISTIC`` (mean action, top-k routes) and returns the
    ``action`` ``[T, A]`` as numpy.
    """

    def __init__(self, policy: TensorDictModuleBase, task_ids: Sequence[int]) -> None:
        self.policy = policy
        parameter = next(policy.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.task_ids = torch.as_tensor(task_ids, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        observation = torch.as_tensor(observations, dtype=torch.float32, device=self.device)
        if observation.shape[0] != self.task_ids.shape[0]:
            raise ValueError(
                f"Got observations of {observation.shape[0]} envs for {self.task_ids.shape[0]} task ids."
            )
        td = TensorDict(observation=observation, task_id=self.task_ids, batch_size=self.task_ids.shape)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            action = self.policy(td).get("action")
        return action.cpu().numpy()

    def reset(self, env_mask: np.ndarray) -> None:
        """The policies are memoryless: nothing to reset."""


def make_eval_envs(
    tasks: Sequence[str],
    *,
    goals: str,
    seed: int,
    max_episode_steps: int,
    reward_function_version: str = "v2",
) -> gym.vector.SyncVectorEnv:
    """One gymnasium env per task (task ``i`` seeded ``seed + i``, as :func:`~d2r_torchrl.envs.make_env`
    seeds it), stepped by the ``SyncVectorEnv`` with same-step autoreset that
    ``metaworld.evaluation`` expects."""
    factories = [
        functools.partial(
            make_gym_task_env,
            name,
            seed=seed + i,
            goals=goals,
            max_episode_steps=max_episode_steps,
            reward_function_version=reward_function_version,
        )
        for i, name in enumerate(tasks)
    ]
    return gym.vector.SyncVectorEnv(factories, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def evaluate(
    policy: TensorDictModuleBase, envs: gym.vector.VectorEnv, tasks: Sequence[str], episodes_per_task: int
) -> EvaluationResult:
    """Run ``metaworld.evaluation.evaluation`` with ``policy`` on ``envs``, whose sub-env ``i``
    is task ``tasks[i]`` with ``task_id`` ``i``; returns the per-task success rate and mean
    return in the order of ``tasks``."""
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}.")
    agent = MetaWorldAgent(policy, range(envs.num_envs))
    _, _, success, returns = evaluation(agent, envs, num_episodes=episodes_per_task)
    if sorted(success) != sorted(tasks) or len(tasks) != envs.num_envs:
        raise ValueError(f"The sub-envs run tasks {sorted(success)}; got the task names {list(tasks)}.")
    return EvaluationResult(
        torch.tensor([success[name] for name in tasks], dtype=torch.float32),
        torch.tensor([float(np.mean(returns[name])) for name in tasks], dtype=torch.float32),
    )
