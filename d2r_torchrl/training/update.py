"""One multi-task SAC update, shared by the trainer and the benchmarks."""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.objectives import SoftUpdate

from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@torch.no_grad()
def clip_grad_norm_stacked_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each network of an ensemble stacked on dim 0 (the twin critics) to ``max_norm``
    separately; returns the per-network norms ``[E]``."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.view(-1, *[1] * (grad.ndim - 1)))
    return norms


def sac_update(
    loss: MultiTaskSACLoss,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
    batch: TensorDictBase,
    grad_clip_norm: float | None = 1.0,
    stacked: tuple[str, ...] = ("critic",),
) -> TensorDictBase:
    """Loss, backward, gradient clipping of every network to ``grad_clip_norm`` (each critic
    of the ``stacked`` ensembles on its own), Adam steps, target soft update, temperature
    refresh. Returns the detached loss TensorDict; writes ``td_error`` into ``batch``.
    Raises :class:`NonFiniteLossError` before any parameter changes."""
    losses = loss(batch)
    total = losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_alpha"]
    if not torch.isfinite(total):
        values = {key: float(losses[key]) for key in ("loss_actor", "loss_qvalue", "loss_alpha")}
        raise NonFiniteLossError(f"Non-finite loss: {values}.")
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    for name, optimizer in optimizers.items():
        params = optimizer.param_groups[0]["params"]
        if grad_clip_norm is not None and name in stacked:
            clip_grad_norm_stacked_(params, grad_clip_norm)
        elif grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        optimizer.step()
    target_updater.step()
    loss.after_update()
    return losses.detach()
