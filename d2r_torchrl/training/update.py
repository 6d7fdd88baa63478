"""One multi-task SAC update, shared by the trainer and the benchmarks."""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.objectives import SoftUpdate

from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def sac_update(
    loss: MultiTaskSACLoss,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
    batch: TensorDictBase,
    grad_clip_norm: float | None = 1.0,
) -> TensorDictBase:
    """Loss, backward, per-network gradient clipping and Adam steps, target soft update,
    temperature refresh. Returns the detached loss TensorDict; writes ``td_error`` into
    ``batch``. Raises :class:`NonFiniteLossError` before any parameter changes."""
    losses = loss(batch)
    total = losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_alpha"]
    if not torch.isfinite(total):
        values = {key: float(losses[key]) for key in ("loss_actor", "loss_qvalue", "loss_alpha")}
        raise NonFiniteLossError(f"Non-finite loss: {values}.")
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    for optimizer in optimizers.values():
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip_norm)
        optimizer.step()
    target_updater.step()
    loss.after_update()
    return losses.detach()
