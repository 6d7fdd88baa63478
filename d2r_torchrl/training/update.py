"""One multi-task SAC update, eager or compiled, shared by the trainer and the benchmarks."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from tensordict import TensorDictBase
from tensordict.nn import CudaGraphModule
from torchrl.objectives import SoftUpdate

from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss

LOSS_KEYS = ("loss_actor", "loss_qvalue", "loss_alpha")

UpdateFn = Callable[[TensorDictBase], TensorDictBase]


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


def make_sac_optimizers(
    loss: MultiTaskSACLoss,
    *,
    actor_lr: float = 3e-4,
    critic_lr: float = 3e-4,
    alpha_lr: float = 1e-4,
    capturable: bool = False,
) -> dict[str, torch.optim.Optimizer]:
    """One Adam per network, as the reference: ``{"actor", "critic" (the twin critics stacked
    on dim 0), "alpha"}`` (``"alpha"`` left out with ``fixed_alpha``).

    PyTorch's fused Adam (one kernel per parameter tensor, the same update): on the CPU the
    default implementation loops over the tensors in Python, which costs a D2R network,
    with its ~46 tensors, about 4x the fused step (benchmarks/RESULTS.md). ``capturable``
    keeps the optimiser state on the device with no host reads (CUDA graphs)."""

    def trainable(params) -> list[torch.Tensor]:
        return [p for p in params.values(True, True) if p.requires_grad]

    options = dict(capturable=capturable, fused=True)
    optimizers = {
        "actor": torch.optim.Adam(trainable(loss.actor_network_params), lr=actor_lr, **options),
        "critic": torch.optim.Adam(trainable(loss.qvalue_network_params), lr=critic_lr, **options),
    }
    if loss.log_alpha.requires_grad:
        optimizers["alpha"] = torch.optim.Adam([loss.log_alpha], lr=alpha_lr, **options)
    return optimizers


def total_loss(losses: TensorDictBase) -> torch.Tensor:
    """``loss_actor + loss_qvalue + loss_alpha``."""
    return sum(losses[key] for key in LOSS_KEYS)


def optimizer_step(
    optimizers: dict[str, torch.optim.Optimizer], grad_clip_norm: float | None, stacked: tuple[str, ...]
) -> None:
    """Clip every network's gradient to ``grad_clip_norm`` (each member of the ``stacked``
    ensembles on its own) and step its optimiser."""
    for name, optimizer in optimizers.items():
        params = optimizer.param_groups[0]["params"]
        if grad_clip_norm is not None and name in stacked:
            clip_grad_norm_stacked_(params, grad_clip_norm)
        elif grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        optimizer.step()


def check_finite(losses: TensorDictBase, context: str = "") -> None:
    """Raise :class:`NonFiniteLossError` when a loss is NaN or infinite (reads the losses on
    the host: one synchronisation)."""
    if not torch.isfinite(total_loss(losses)):
        values = {key: float(losses[key]) for key in LOSS_KEYS}
        raise NonFiniteLossError(f"Non-finite loss: {values}.{context}")


def sac_update(
    loss: MultiTaskSACLoss,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
    batch: TensorDictBase,
    grad_clip_norm: float | None = 1.0,
    stacked: tuple[str, ...] = ("critic",),
) -> TensorDictBase:
    """Loss, backward, gradient clipping of every network to ``grad_clip_norm`` (each critic
    of the ``stacked`` ensembles on its own), Adam steps (with the temperature refresh they
    trigger), target soft update. Returns the detached loss TensorDict (with ``td_error`` ``[B]``); writes
    ``td_error`` into ``batch``. Raises :class:`NonFiniteLossError` before any parameter
    changes (one host synchronisation per call: the compiled update of
    :func:`make_update` checks once per round instead)."""
    losses = loss(batch)
    check_finite(losses)
    step = functools.partial(optimizer_step, optimizers, grad_clip_norm, stacked)
    return _apply(loss, optimizers, target_updater, batch, losses, step)


def _apply(
    loss: MultiTaskSACLoss,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
    batch: TensorDictBase,
    losses: TensorDictBase,
    step: Callable[[], None],
) -> TensorDictBase:
    """Backward of ``losses``, ``step()`` (clipping and optimisers; the alpha optimiser's step
    caps the temperatures and refreshes the routing temperatures, see
    :class:`MultiTaskSACLoss`) and target soft update; returns the detached losses with the
    batch's ``td_error``."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total_loss(losses).backward()
    step()
    target_updater.step()
    losses = losses.detach()
    losses.set(loss.tensor_keys.priority, batch.get(loss.tensor_keys.priority))
    return losses


def make_update(
    loss: MultiTaskSACLoss,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
    grad_clip_norm: float | None = 1.0,
    stacked: tuple[str, ...] = ("critic",),
    *,
    compile: bool = False,
    mode: str | None = None,
    backend: str = "inductor",
    cudagraphs: bool = False,
    cudagraph_warmup: int = 5,
) -> UpdateFn:
    """The update the trainer calls on each batch: ``update(batch) -> losses``.

    Eager (``compile=False``, ``cudagraphs=False``): :func:`sac_update`, which checks the
    losses before any parameter changes. Otherwise the same computation without that host
    synchronisation (the caller checks the returned losses with :func:`check_finite`):

    * ``compile``: the loss is compiled with ``torch.compile(fullgraph=True)`` (its backward
      through AOTAutograd), the clipping and optimiser steps with ``torch.compile`` (PyTorch's
      ``Optimizer.step`` breaks the graph around itself by design); D2R critics then run
      one after the other (``loss.deactivate_vmap``), as Dynamo does not trace the vmapped
      module chain. ``mode`` and ``backend`` go to ``torch.compile``.
    * ``cudagraphs``: the whole update is captured in a CUDA graph with tensordict's
      :class:`~tensordict.nn.CudaGraphModule` after ``cudagraph_warmup`` eager calls (CUDA
      only; the optimisers must be built with ``capturable=True``).

    ``tests/test_update.py`` checks that the compiled update gives the eager losses and
    parameters on a fixed batch.
    """
    if not compile and not cudagraphs:
        return functools.partial(
            sac_update, loss, optimizers, target_updater, grad_clip_norm=grad_clip_norm, stacked=stacked
        )
    step = functools.partial(optimizer_step, optimizers, grad_clip_norm, stacked)
    forward = loss
    if compile:
        loss.deactivate_vmap = True  # read by MultiTaskSACLoss._critics on every call
        forward = torch.compile(loss, fullgraph=True, mode=mode, backend=backend)
        step = torch.compile(step, mode=mode, backend=backend)  # Optimizer.step breaks the graph by design

    def update(batch: TensorDictBase) -> TensorDictBase:
        return _apply(loss, optimizers, target_updater, batch, forward(batch), step)

    if cudagraphs:
        return CudaGraphModule(update, in_keys=[], out_keys=[], warmup=cudagraph_warmup)
    return update
