"""Options on the critic's TD target: a bound on its size and per-task reward scales.

Both act on what the TD target ``y = r + gamma (1 - terminated) (min_k Qbar_k(s', a') -
alpha log pi(a'|s'))`` is built from, so any SAC-style loss can use them
(:class:`~d2r_torchrl.objectives.MultiTaskSACLoss` takes them as ``td_target_bound`` and
``reward_normalization``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

METAWORLD_MAX_REWARD = 10.0  # Meta-World's per-step rewards lie in [0, 10]


def soft_return_bound(
    max_reward: float,
    gamma: float,
    *,
    max_alpha: float = 0.0,
    action_dim: int = 0,
    horizon: int | None = None,
) -> float:
    """The largest soft value a critic can have to learn: per step at most ``max_reward`` plus
    the entropy bonus ``alpha H`` (``H <= |A| log 2`` for a policy on ``[-1, 1]^|A|``, the
    uniform one; ``alpha <= max_alpha``), discounted over ``horizon`` steps::

        B = (max_reward + max_alpha |A| log 2) (1 - gamma^H) / (1 - gamma)

    ``horizon=None`` is the infinite-horizon form ``(...) / (1 - gamma)``: the one for a loss
    that bootstraps through time limits (Q then estimates an unending return); a finite
    ``horizon`` fits one that treats time limits as terminal.

    E.g. Meta-World at reward scale 1, ``gamma = 0.99``, no entropy term: ``10 / 0.01 = 1000``.
    """
    if max_reward <= 0 or not 0 < gamma < 1 or max_alpha < 0 or action_dim < 0:
        raise ValueError(
            f"soft_return_bound needs max_reward > 0, 0 < gamma < 1, max_alpha >= 0 and action_dim >= 0; "
            f"got {max_reward}, {gamma}, {max_alpha}, {action_dim}."
        )
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be >= 1 or None, got {horizon}.")
    per_step = max_reward + max_alpha * action_dim * math.log(2.0)
    discounted_steps = (1 - gamma**horizon if horizon is not None else 1.0) / (1 - gamma)
    return per_step * discounted_steps


def clip_td_target(target: torch.Tensor, bound: float | None) -> torch.Tensor:
    """``target`` clamped to ``[-bound, bound]`` (unchanged for ``bound=None``).

    Soft values can be negative as well (``-alpha log pi`` is unbounded below), so the clip
    is symmetric."""
    return target if bound is None else target.clamp(-bound, bound)


class PerTaskRewardScale(nn.Module):
    """Per-task reward normalisation: task ``t``'s rewards divided by ``s_t``, the largest
    ``|r|`` of that task in any batch seen so far, floored at ``floor``::

        s_t <- max(s_t, max_{i: task_i = t} |r_i|);   r_i <- r_i / max(s_{task_i}, floor)

    so every task's largest reward becomes 1 (Meta-World's largest, 10, at the reference's
    reward scale 0.1 is 1 as well) whatever rewards it reaches; ``floor`` caps the
    amplification of a task that has seen only small rewards at ``1 / floor`` times its
    scale. ``s_t`` only grows, so the targets of a task change at most when a larger reward
    arrives. The scales are the buffer ``max_abs_reward`` ``[T]`` (0 until a task's first
    batch), saved with the module's state dict, so a resumed run keeps them.

    ``forward(reward [B] or [B, 1], task_id [B])`` updates the scales from the batch (no
    gradient) and returns the normalised rewards, shaped as ``reward``. A non-finite reward
    leaves its task's scale as it was (it would stay there for good) and comes out
    non-finite, for the loss's finite check to stop at.
    """

    def __init__(self, num_tasks: int, floor: float) -> None:
        super().__init__()
        if num_tasks < 1 or floor <= 0:
            raise ValueError(f"PerTaskRewardScale needs num_tasks >= 1 and floor > 0, got {num_tasks} and {floor}.")
        self.floor = floor
        self.register_buffer("max_abs_reward", torch.zeros(num_tasks))

    def forward(self, reward: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        flat = reward.reshape(task_id.shape[0], -1).detach().abs().amax(-1)
        flat = torch.where(flat.isfinite(), flat, torch.zeros_like(flat))
        with torch.no_grad():
            self.max_abs_reward.scatter_reduce_(0, task_id, flat.to(self.max_abs_reward.dtype), reduce="amax")
        scale = self.max_abs_reward[task_id].clamp(min=self.floor).to(reward.dtype)
        return reward / scale.reshape(-1, *([1] * (reward.ndim - 1)))
