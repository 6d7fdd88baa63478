"""The method's pieces as hooks of TorchRL's own trainer (``torchrl.trainers.Trainer`` and
``torchrl.trainers.algorithms.SACTrainer``), each registered with one call ``hook.register(trainer)``.

* :class:`PerNetworkClipStepper`: the update of METHOD.md section 3 as an
  ``OptimizationStepper``: one optimiser per network, each network's gradient clipped on its
  own (each twin critic separately), non-finite losses refused before any parameter changes.
  TorchRL's default step clips all parameters together with one optimiser.
* :class:`PerTaskLogger`: logs the loss's per-task outputs ``[T]`` (temperatures, route
  depth, masked tasks, ...) and the actor's routing temperatures as one scalar per task;
  TorchRL's ``LogScalar`` and its automatic loss logging skip non-scalar values.
* :class:`MetaWorldEvaluation`: Meta-World's evaluation protocol every few collected batches,
  per-task and mean success and return.

Route balancing and the temperature cap need no hook: :class:`~d2r_torchrl.objectives.MultiTaskSACLoss`
runs them after every optimiser step that updates its ``log_alpha``.
"""
from __future__ import annotations

from typing import Sequence

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.trainers import OptimizationStepper, Trainer, TrainerHookBase

from d2r_torchrl.modules.actor_critic import d2r_networks
from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss
from d2r_torchrl.training.evaluation import evaluate
from d2r_torchrl.training.update import check_finite, optimizer_step, total_loss


def per_task_scalars(values: dict[str, torch.Tensor], tasks: Sequence[str], prefix: str) -> dict[str, float]:
    """``{key: [T] tensor}`` -> ``{f"{prefix}{key}/{task}": float}`` and the mean over tasks
    (NaN entries left out) as ``f"{prefix}{key}_mean"``."""
    out = {}
    for key, value in values.items():
        value = value.detach().float().cpu()
        out.update({f"{prefix}{key}/{task}": float(v) for task, v in zip(tasks, value)})
        out[f"{prefix}{key}_mean"] = float(value.nanmean())
    return out


class PerNetworkClipStepper(OptimizationStepper):
    """One multi-task SAC update per sub-batch: loss, the trainer's ``post_loss`` hooks (e.g.
    the replay buffer's priority update), backward of ``loss_actor + loss_qvalue +
    loss_alpha``, each network's gradient clipped to ``grad_clip_norm`` (the twin critics
    each on their own), one step of each optimiser. Target updates stay the trainer's
    ``post_optim`` hooks (``SACTrainer`` registers its ``target_net_updater`` there).

    Args:
        optimizers: ``{"actor": ..., "critic": ..., "alpha": ...}`` as built by
            :func:`~d2r_torchrl.training.update.make_sac_optimizers` (the ``"critic"``
            optimiser holds the twin critics stacked on dim 0).
        grad_clip_norm: ``None`` for no clipping.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], grad_clip_norm: float | None = 1.0) -> None:
        if grad_clip_norm is not None and not (0 < grad_clip_norm < float("inf")):
            raise ValueError(f"grad_clip_norm must be a finite number > 0 or None, got {grad_clip_norm}.")
        self.optimizers = optimizers
        self.grad_clip_norm = grad_clip_norm

    def step(self, trainer: Trainer, sub_batch: TensorDictBase) -> TensorDictBase:
        losses = trainer.loss_module(sub_batch)
        check_finite(losses)
        trainer._post_loss_hook(sub_batch)  # TorchRL skips this stage when a stepper is set
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        total_loss(losses).backward()
        optimizer_step(self.optimizers, self.grad_clip_norm, stacked=("critic",))
        return losses.detach()

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict[name])

    def register(self, trainer: Trainer, name: str = "optimization_stepper") -> None:
        """Make this the trainer's optimisation step (also for ``SACTrainer``, which takes no
        stepper argument) and checkpoint the optimisers with it."""
        trainer.optimization_stepper = self
        super().register(trainer, name)


class PerTaskLogger(TrainerHookBase):
    """At ``post_optim_complete_log``: every ``[T]`` output of the loss, averaged over the
    batch's updates, as ``{prefix}{key}/{task}`` and ``{prefix}{key}_mean``, and the actor's
    routing temperatures as ``{prefix}route_temperature/{task}``."""

    def __init__(self, loss: MultiTaskSACLoss, tasks: Sequence[str], prefix: str = "train/") -> None:
        if len(tasks) != loss.num_tasks:
            raise ValueError(f"{len(tasks)} task names for a loss of {loss.num_tasks} tasks.")
        self.loss = loss
        self.tasks = list(tasks)
        self.prefix = prefix

    def __call__(self, optim_steps: int, losses: TensorDictBase | None) -> dict[str, float]:
        values: dict[str, torch.Tensor] = {}
        if losses is not None:
            values = {key: value for key, value in losses.items() if value.shape == (len(self.tasks),)}
        networks = d2r_networks(self.loss.actor_network)
        if networks:
            values["route_temperature"] = networks[0].route_temperature
        return per_task_scalars(values, self.tasks, self.prefix)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def register(self, trainer: Trainer, name: str = "per_task_logger") -> None:
        trainer.register_op("post_optim_complete_log", self)
        trainer.register_module(name, self)


class MetaWorldEvaluation(TrainerHookBase):
    """At ``post_steps_log``, every ``interval`` collected batches: Meta-World's evaluation
    protocol (:func:`~d2r_torchrl.training.evaluation.evaluate`) with deterministic actions,
    logged as ``eval/success/{task}``, ``eval/success_mean``, ``eval/return/{task}`` and
    ``eval/return_mean`` (TorchRL's trainer logs a key at most every ``log_interval`` frames).

    Args:
        policy: the actor, reading ``observation`` and ``task_id``.
        envs: Meta-World's evaluation vector env, sub-env ``i`` running ``tasks[i]``
            (:func:`~d2r_torchrl.training.evaluation.make_eval_envs`).
        tasks: the task names, in task-id order.
        episodes_per_task: episodes of every task per evaluation.
        interval: collected batches between evaluations.
    """

    def __init__(
        self,
        policy: TensorDictModuleBase,
        envs: gym.vector.VectorEnv,
        tasks: Sequence[str],
        episodes_per_task: int,
        interval: int = 1,
    ) -> None:
        if episodes_per_task < 1 or interval < 1:
            raise ValueError(f"episodes_per_task and interval must be >= 1, got {episodes_per_task} and {interval}.")
        self.policy = policy
        self.envs = envs
        self.tasks = list(tasks)
        self.episodes_per_task = episodes_per_task
        self.interval = interval
        self.batches = 0

    def __call__(self, batch: TensorDictBase | None = None) -> dict[str, float] | None:
        self.batches += 1
        if self.batches % self.interval:
            return None
        training = self.policy.training
        self.policy.eval()
        try:
            result = evaluate(self.policy, self.envs, self.tasks, self.episodes_per_task)
        finally:
            self.policy.train(training)
        return per_task_scalars({"success": result.success, "return": result.episode_return}, self.tasks, "eval/")

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batches = state_dict["batches"]

    def register(self, trainer: Trainer, name: str = "metaworld_evaluation") -> None:
        trainer.register_op("post_steps_log", self)
        trainer.register_module(name, self)
