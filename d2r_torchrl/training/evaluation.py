"""Deterministic evaluation: top-k routes, mean actions, success at any step."""
from __future__ import annotations

import torch
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type


@torch.no_grad()
def evaluate(policy, env: EnvBase, episodes_per_task: int, max_episode_steps: int) -> torch.Tensor:
    """Success rate per task ``[T]`` over ``episodes_per_task`` episodes of every task.

    Each rollout runs one full episode in every sub-env (episodes end by the time limit;
    Meta-World does not terminate on success), so an episode succeeds when
    ``episode_success`` is set at its last step.
    """
    successes = []
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes_per_task):
            rollout = env.rollout(
                max_episode_steps, policy, break_when_any_done=False, auto_cast_to_device=True
            )
            successes.append(rollout.get(("next", "episode_success"))[:, -1].reshape(-1).float())
    return torch.stack(successes).mean(0)
