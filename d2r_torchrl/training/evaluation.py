"""Deterministic evaluation: top-k routes, mean actions, success at any step."""
from __future__ import annotations

from typing import NamedTuple

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type


class EvaluationResult(NamedTuple):
    """Per-task means over the evaluation episodes, each ``[T]``."""

    success: torch.Tensor
    episode_return: torch.Tensor


@torch.no_grad()
def evaluate(
    policy: TensorDictModuleBase, env: EnvBase, episodes_per_task: int, max_episode_steps: int
) -> EvaluationResult:
    """Success rate and undiscounted return per task over ``episodes_per_task`` episodes each.

    Each rollout runs one full episode in every sub-env (episodes end by the time limit;
    Meta-World does not terminate on success), so an episode succeeds when
    ``episode_success`` is set at its last step. Returns are in the env's reward units
    (``env.reward_scale`` applied).
    """
    successes, returns = [], []
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes_per_task):
            rollout = env.rollout(
                max_episode_steps, policy, break_when_any_done=False, auto_cast_to_device=True
            )
            successes.append(rollout.get(("next", "episode_success"))[:, -1].reshape(-1).float())
            returns.append(rollout.get(("next", "reward")).sum(1).reshape(-1).float())
    return EvaluationResult(torch.stack(successes).mean(0), torch.stack(returns).mean(0))
