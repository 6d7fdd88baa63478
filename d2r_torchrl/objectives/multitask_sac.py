"""Multi-task SAC loss (METHOD.md section 3) for D2R and the baselines."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import ProbabilisticTensorDictSequential, TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import SACLoss
from torchrl.objectives.sac import compute_rsample_log_prob
from torchrl.objectives.common import add_random_module

from d2r_torchrl import argument_checks as check
from d2r_torchrl.modules.actor_critic import (
    ROUTE_KEY,
    TASK_KEY,
    VALUE_LOGITS_KEY,
    d2r_networks,
    is_routed,
    set_multitask_keys,
)
from d2r_torchrl.modules.d2r import D2RNetwork, route_temperature_from_log_alpha
from d2r_torchrl.modules.routing import RoutingMode, route_depth, set_routing_mode
from d2r_torchrl.modules.task_conditioning import check_task_range, flatten_task_id, host_checks_apply
from d2r_torchrl.objectives.value_targets import PerTaskRewardScale, clip_td_target

add_random_module(D2RNetwork)

EXTREME_LOSS_RULES = ("clip", "reference")
REDUCTIONS = ("mean", "sum", "none")
REFERENCE_REWARD_SCALE = 0.1


def per_task_mean(
    values: torch.Tensor, task_id: torch.Tensor, num_tasks: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` ``[..., B]`` over each task's samples -> ``([..., T], counts [T])``.

    With ``weights`` ``[B]`` (importance weights of prioritized replay) the mean is
    ``sum_i w_i v_i / n_t``. Tasks with no sample get 0.
    """
    if weights is not None:
        values = values * weights
    sums = values.new_zeros(*values.shape[:-1], num_tasks).index_add(-1, task_id, values)
    counts = torch.zeros(num_tasks, device=values.device).index_add(
        0, task_id, torch.ones_like(task_id, dtype=torch.float32)
    )
    return sums / counts.clamp(min=1.0), counts


def weights_averaging_one_per_task(weights: torch.Tensor, task_id: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Importance weights ``[B]`` divided by their mean over each task's samples -> ``[B]``
    (each task's weights then average 1: only their ratios within the task remain; a task
    whose weights are all 0 keeps them). Raises ``ValueError`` on a negative or non-finite
    weight (skipped where host checks cannot run, see ``host_checks_apply``)."""
    if host_checks_apply(weights) and not bool((valid := weights.isfinite() & (weights >= 0)).all()):
        bad = weights[~valid]
        raise ValueError(
            f"Importance weights must be finite and non-negative; got {bad[:5].tolist()} "
            f"({bad.numel()} of {weights.numel()})."
        )
    mean, _ = per_task_mean(weights, task_id, num_tasks)
    return weights / mean.clamp(min=torch.finfo(mean.dtype).tiny)[task_id]


def per_task_abs_max(values: torch.Tensor, task_id: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Largest ``|value|`` of ``values`` ``[..., B]`` over each task's samples (and the leading
    dims) -> ``[T]``; NaN for a task with no sample."""
    largest = values.abs().reshape(-1, values.shape[-1]).amax(0)
    empty = torch.full((num_tasks,), torch.nan, dtype=values.dtype, device=values.device)
    return empty.scatter_reduce(0, task_id, largest, "amax", include_self=False)


class MultiTaskSACLoss(SACLoss):
    """SAC with one temperature per task, loss balancing and D2R routing modes.

    Per task ``t`` (each term is the mean over that task's samples in the batch)::

        J_alpha_t = -mean[log alpha_t (log pi(a~|s) - |A|)]
        J_pi_t    = w_t mean[alpha_t log pi(a~|s) - min_k Q_k(s, a~)]
        J_Q_t     = w_t mean[sum_k (Q_k(s, a) - y)^2]   (a categorical critic: its cross-entropy)
        y = r + gamma (1 - terminated) (min_k Qbar_k(s', a') - alpha_t log pi(a'|s'))

    with ``w_t = T softmax(-log alpha)_t`` (detached) when ``loss_balancing`` is on, else 1.
    The reported losses are ``sum_t c_t J_t / P``, where ``P`` is the number of tasks
    present in the batch and ``c_t`` the extreme-task factor below. With a stratified batch
    (same count per task, as the reference) this equals the reference's batch mean; with
    uneven counts (uniform or prioritized sampling) every present task still weighs the
    same. Importance weights ``p_i`` (``priority_weight``, prioritized replay) are first
    divided by their mean over the task's samples in the batch, so each task's terms are
    the self-normalised estimate ``sum_i p_i x_i / sum_i p_i``: whatever a sampler
    normalises its weights by (PER's largest weight, i.e. the smallest priority held,
    which differs from task to task), every task's terms keep the scale of uniform
    replay, and with them ``w_t``, ``tau`` and the logged losses their meaning.

    Extreme tasks (``L_t = J_alpha_t + J_pi_t + J_Q_t`` above a threshold ``tau``; for a
    categorical critic ``J_Q_t`` in ``L_t`` is the squared TD error of its expected ``Q``, not
    its cross-entropy, so ``tau`` means the same with either head):

    * ``"reference"`` (the authors' rule): ``tau = extreme_loss_threshold`` as given and
      ``c_t = 0``. A dropped task gets no gradient at all, its critic included, and the
      critic term is the only one that can bring ``L_t`` back under ``tau``; the targets
      keep moving and new data keeps arriving, so the task can stay dropped for good.
      The reference's 3000 was set at reward scale 0.1; at reward scale 1 the same TD
      errors give 100 times the loss.
    * ``"clip"`` (default): ``tau = extreme_loss_threshold * (reward_scale / 0.1)^2`` and
      ``c_t = tau / L_t`` (detached). The threshold is relative to the reward scale because
      the loss that makes a task extreme is the critic's: ``Q`` and ``y`` scale linearly
      with the rewards (alpha scaling with them too), so ``J_Q`` scales with their square
      and the same ``tau`` means the same thing at 0.1 and at 1.0. Scaling instead of
      dropping keeps every term of the task, the critic's included, with its direction:
      the task's share of each shared network's gradient is capped at that of a task with
      loss ``tau`` (the protection the rule exists for), yet it never stops learning, so its
      loss can fall back and the factor returns to 1. Adam normalises the gradient's scale,
      so a task trained alone keeps its step size.

    ``task_masked`` ``[T]`` (bool) flags the tasks above ``tau`` at this update and
    ``task_scale`` ``[T]`` holds ``c_t`` (1 for kept tasks, 0 for absent ones).
    ``task_q_max`` ``[T]`` is the largest ``|Q_k(s, a)|`` of each task's samples over both
    critics (the expected value for a categorical critic; NaN for absent tasks), in the
    units of ``y`` (normalised with ``reward_normalization``): a diverging critic shows there
    whatever its loss. With a
    ``td_target_bound``, ``task_clipped`` ``[T]`` is the fraction of each task's targets
    that the bound clipped (0 for absent tasks).

    Routing (D2R networks; other networks ignore it): the policy term replays the stored
    behaviour route ``("routing", "path")`` with ResRouting; ``Q(s, a)`` in the TD term
    samples routes with the per-task temperature; the target action ``a'``, the target
    critics and ``Q(s, a~)`` in the policy term take the top-k route.

    Route balancing and the temperature cap are carried by the loss itself: after every
    optimiser step that updates ``log_alpha`` (any loop, any optimiser holding it: a global
    PyTorch optimiser step hook), :meth:`after_update` clamps ``log alpha`` to
    ``[log min_alpha, log max_alpha]`` and sets the routing temperature of the actor (the
    module the collector runs, whose buffers ``update_policy_weights_()`` sends on), the
    critics and their targets to ``T softmax(-log alpha)``. Calling it by hand is harmless.

    Keys (TorchRL's ``_AcceptedKeys``, renamed with :meth:`set_keys`): SACLoss's, plus
    ``task_id`` (``"task_id"``) and ``route`` (``("routing", "path")``). Renaming them also
    renames what the actor and critic read and write.

    Args:
        actor_network: a ``ProbabilisticActor`` (see :func:`~d2r_torchrl.modules.make_actor`).
        qvalue_network: one critic; two independent copies are made.
        num_tasks: ``T``.
        loss_balancing: multiply policy and critic terms by ``w_t``.
        alpha_init: initial temperature of every task.
        min_alpha, max_alpha: bounds on every task's temperature (TorchRL's SACLoss options;
            the reference caps ``log alpha`` at 0, ``max_alpha=1``). ``None``: unbounded.
        fixed_alpha: keep every temperature at ``alpha_init`` (a buffer, not trained).
        target_entropy: ``H-bar``; ``"auto"`` is ``-|A|`` (from the action spec).
        reduction: ``"mean"`` (the loss above), ``"sum"`` (``B`` times it) or ``"none"``
            (per-sample losses ``[B]`` whose mean is the ``"mean"`` loss; the per-task
            outputs are left out).
        extreme_loss_threshold: the extreme-task threshold at reward scale 0.1 (``None``
            turns the rule off).
        extreme_loss_rule: ``"clip"`` (default) or ``"reference"``, see above.
        reward_scale: the scale of the rewards in the batch; sets ``tau`` of ``"clip"``.
        time_limit_terminal: treat ``done`` (time limits included) as terminal, as the
            reference code did; by default only ``terminated`` stops bootstrapping.
        deactivate_vmap: run the twin critics one after the other instead of under
            ``torch.vmap`` (under vmap, D2R critics run as one batched module chain).
        td_target_bound: clamp the TD target ``y`` to ``[-bound, bound]``
            (:func:`~d2r_torchrl.objectives.value_targets.soft_return_bound` gives the bound
            that rewards, entropy bonus and gamma imply); ``None`` (default) does not clip.
        reward_normalization: a
            :class:`~d2r_torchrl.objectives.value_targets.PerTaskRewardScale` that divides each
            task's rewards in ``y`` by that task's scale (kept in this loss's state dict);
            ``None`` (default) uses the rewards as they are.
    """

    @dataclass
    class _AcceptedKeys(SACLoss._AcceptedKeys):
        """SACLoss's keys, plus ``task_id`` (the task index ``[B]`` or ``[B, 1]``, also read
        under ``"next"``) and ``route`` (the behaviour route ``[B, N(N+1)/2]`` bool that D2R
        actors write at collection and the policy term replays)."""

        task_id: NestedKey = TASK_KEY
        route: NestedKey = ROUTE_KEY

    default_keys = _AcceptedKeys
    PER_TASK_OUT_KEYS = ("task_loss", "task_masked", "task_scale", "task_count", "task_q_max", "balancing_weight")

    def __init__(
        self,
        actor_network: ProbabilisticTensorDictSequential,
        qvalue_network: TensorDictModuleBase,
        *,
        num_tasks: int,
        loss_balancing: bool = True,
        alpha_init: float = 1.0,
        min_alpha: float | None = None,
        max_alpha: float | None = 1.0,
        fixed_alpha: bool = False,
        target_entropy: str | float = "auto",
        reduction: str = "mean",
        extreme_loss_threshold: float | None = 3000.0,
        extreme_loss_rule: str = "clip",
        reward_scale: float = REFERENCE_REWARD_SCALE,
        time_limit_terminal: bool = False,
        action_spec=None,
        deactivate_vmap: bool = False,
        td_target_bound: float | None = None,
        reward_normalization: PerTaskRewardScale | None = None,
    ) -> None:
        check.positive_int("num_tasks", num_tasks)
        check.finite("alpha_init", alpha_init, positive=True)
        check.finite("min_alpha", min_alpha, positive=True, optional=True)
        check.finite("max_alpha", max_alpha, positive=True, optional=True)
        if min_alpha is not None and max_alpha is not None and min_alpha > max_alpha:
            raise ValueError(f"min_alpha {min_alpha} is above max_alpha {max_alpha}.")
        if target_entropy != "auto":
            check.finite("target_entropy", target_entropy)
        if reduction not in REDUCTIONS:
            raise ValueError(f"Unknown reduction {reduction!r}; accepted: {list(REDUCTIONS)}.")
        check.finite("extreme_loss_threshold", extreme_loss_threshold, positive=True, optional=True)
        check.finite("reward_scale", reward_scale, positive=True)
        check.finite("td_target_bound", td_target_bound, positive=True, optional=True)
        if extreme_loss_rule not in EXTREME_LOSS_RULES:
            raise ValueError(f"Unknown extreme_loss_rule {extreme_loss_rule!r}; accepted: {list(EXTREME_LOSS_RULES)}.")
        if reward_normalization is not None and not isinstance(reward_normalization, PerTaskRewardScale):
            raise TypeError(
                f"reward_normalization must be a PerTaskRewardScale or None, got {type(reward_normalization).__name__}."
            )
        super().__init__(
            actor_network,
            qvalue_network,
            num_qvalue_nets=2,
            loss_function="l2",
            alpha_init=alpha_init,
            min_alpha=min_alpha,
            max_alpha=max_alpha,
            fixed_alpha=fixed_alpha,
            target_entropy=target_entropy,
            action_spec=action_spec,
            delay_qvalue=True,
            deactivate_vmap=deactivate_vmap,
            reduction=reduction,
            scalar_output_mode="exclude",
        )
        del self.log_alpha
        log_alpha = torch.full((num_tasks,), math.log(alpha_init), device=self.device)
        if fixed_alpha:
            self.register_buffer("log_alpha", log_alpha)
        else:
            self.log_alpha = nn.Parameter(log_alpha)
        self.num_tasks = num_tasks
        self.loss_balancing = loss_balancing
        self.extreme_loss_threshold = extreme_loss_threshold
        self.extreme_loss_rule = extreme_loss_rule
        self.reward_scale = reward_scale
        self.td_target_bound = td_target_bound
        # its scales live with the rewards, on the loss's device (as log_alpha)
        self.reward_normalization = None if reward_normalization is None else reward_normalization.to(self.device)
        routed = d2r_networks(actor_network)
        self.route_layout = routed[0].layout if routed else None
        actor_keys, critic_keys = (
            [key for key in getattr(self, name).keys(True, True) if key[-1] == "route_temperature"]
            for name in ("actor_network_params", "qvalue_network_params")
        )
        # The target critics share the critics' keys.
        self._temperature_keys = {
            "actor_network_params": actor_keys,
            "qvalue_network_params": critic_keys,
            "target_qvalue_network_params": critic_keys,
        }
        if time_limit_terminal:
            self.set_keys(terminated=self.tensor_keys.done)
        self.set_vmap_randomness("different")
        self.after_update()
        _LIVE_LOSSES.add(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _LIVE_LOSSES.add(self)  # copies (deepcopy, pickling) carry route balancing too

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """After :meth:`set_keys`: the actor and critic read the renamed task and route keys."""
        if {"task_id", "route"} & kwargs.keys():
            for network in (self.actor_network, self.qvalue_network):
                set_multitask_keys(network, task_id=self.tensor_keys.task_id, route=self.tensor_keys.route)
        super()._forward_value_estimator_keys(**kwargs)

    def _set_in_keys(self) -> None:
        super()._set_in_keys()  # also runs inside SACLoss.__init__, before route_layout is set
        if is_routed(self.actor_network) and self.tensor_keys.route not in self._in_keys:
            self._in_keys.append(self.tensor_keys.route)

    @property
    def out_keys(self) -> list[str]:
        keys = ["loss_actor", "loss_qvalue", "loss_alpha"]
        if self.reduction == "none":
            return keys
        routed = ["route_depth"] if is_routed(self.actor_network) else []
        clipped = ["task_clipped"] if self.td_target_bound is not None else []
        return keys + ["alpha", "entropy", *self.PER_TASK_OUT_KEYS, *clipped, *routed]

    @out_keys.setter
    def out_keys(self, values) -> None:
        pass  # computed from the options above (TorchRL's base class assigns it once)

    def reset_parameters_recursive(self) -> None:
        """Re-draw the actor's and both critics' parameters with the project's initialisation
        (each network's ``reset_parameters``) and start the target critics equal to the critics."""
        super().reset_parameters_recursive()
        self.target_qvalue_network_params.data.copy_(self.qvalue_network_params.data)

    @property
    def _alpha(self) -> torch.Tensor:
        return self._log_alpha_capped().exp()

    def _log_alpha_capped(self) -> torch.Tensor:
        """``log alpha`` ``[T]`` (detached) within ``[log min_alpha, log max_alpha]``."""
        log_alpha = self.log_alpha.detach()
        if self.min_log_alpha is None and self.max_log_alpha is None:
            return log_alpha
        return log_alpha.clamp(self.min_log_alpha, self.max_log_alpha)

    def extreme_task_threshold(self) -> float | None:
        """``tau``: the threshold as given (``"reference"``) or scaled by ``(reward_scale / 0.1)^2``."""
        if self.extreme_loss_threshold is None or self.extreme_loss_rule == "reference":
            return self.extreme_loss_threshold
        return self.extreme_loss_threshold * (self.reward_scale / REFERENCE_REWARD_SCALE) ** 2

    def extreme_task_scale(self, task_loss: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_t [T], masked [T])`` from the detached per-task losses ``L_t`` ``[T]`` and the
        tasks ``present`` in the batch ``[T]`` (see the class docstring)."""
        scale = present.to(task_loss.dtype)
        threshold = self.extreme_task_threshold()
        if threshold is None:
            return scale, torch.zeros_like(present)
        masked = present & (task_loss > threshold)
        factor = torch.zeros_like(task_loss) if self.extreme_loss_rule == "reference" else threshold / task_loss.clamp(min=threshold)
        return torch.where(masked, factor, scale), masked

    def balancing_weights(self) -> torch.Tensor:
        """``[T]``: ``T softmax(-log alpha)`` when balancing, else ones."""
        if not self.loss_balancing:
            return torch.ones_like(self.log_alpha.detach())
        return route_temperature_from_log_alpha(self.log_alpha)

    @torch.no_grad()
    def after_update(self) -> None:
        """Clamp ``log alpha`` to its bounds and set every D2R network's routing temperature
        from it (run automatically after each optimiser step that updates ``log_alpha``)."""
        self.log_alpha.copy_(self._log_alpha_capped())
        temperature = route_temperature_from_log_alpha(self.log_alpha)
        for name, keys in self._temperature_keys.items():
            # Read as registered modules: TorchRL's attribute access to target parameters warns
            # until a target updater is attached, which happens after construction (where this runs first).
            params = self._modules[name]
            for key in keys:
                value = params.get(key)
                value.data.copy_(temperature.expand_as(value))

    def _task_ids(self, tensordict: TensorDictBase) -> torch.Tensor:
        key = self.tensor_keys.task_id
        task_id = tensordict.get(key, None)
        if task_id is None:
            raise KeyError(
                f"MultiTaskSACLoss needs {key!r} in the batch; found {list(tensordict.keys(True, True))}."
            )
        task_id = flatten_task_id(task_id, tensordict.batch_size)
        check_task_range(task_id, self.num_tasks)
        return task_id

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        original = tensordict
        if tensordict.ndim != 1:
            tensordict = tensordict.reshape(-1)
        task_id = self._task_ids(tensordict)
        route_key = self.tensor_keys.route
        if self.route_layout is not None and route_key not in tensordict.keys(True, True):
            raise KeyError(
                f"The D2R policy term replays the behaviour route {route_key}, which is missing "
                "from the batch: store the actor's output with every transition."
            )
        weights = self._maybe_get_priority_weight(tensordict)
        if weights is not None:
            weights = weights_averaging_one_per_task(weights.reshape(-1), task_id, self.num_tasks)
        alpha = self._alpha[task_id]

        q_pred, target, critic_error, clipped = self._critic_terms(tensordict, alpha)
        log_prob, min_q, route = self._actor_terms(tensordict)
        terms = torch.stack(
            [
                -self.log_alpha[task_id] * (log_prob.detach() + self.target_entropy),
                alpha * log_prob - min_q,
                critic_error,
            ]
        )
        per_task, counts = per_task_mean(terms, task_id, self.num_tasks, weights)
        balance = self.balancing_weights()
        alpha_t, actor_t, critic_t = per_task[0], balance * per_task[1], balance * per_task[2]
        squared_td_t = critic_t
        if getattr(self.qvalue_network, "value_head", None) is not None:  # critic_t is a cross-entropy
            squared_td_t = balance * per_task_mean((q_pred - target).pow(2).sum(0), task_id, self.num_tasks, weights)[0]
        task_loss = (alpha_t + actor_t + squared_td_t).detach()
        present = counts > 0
        task_scale, masked = self.extreme_task_scale(task_loss, present)
        scale = task_scale / present.sum().clamp(min=1)

        td_error = (q_pred - target).abs().max(0).values.detach()
        original.set(self.tensor_keys.priority, td_error.reshape(original.shape))
        if self.reduction == "none":
            return self._per_sample_losses(terms, task_id, counts, scale, balance, weights, original.shape)
        size = task_id.numel() if self.reduction == "sum" else 1
        out = {
            "loss_actor": size * (scale * actor_t).sum(),
            "loss_qvalue": size * (scale * critic_t).sum(),
            "loss_alpha": size * (scale * alpha_t).sum(),
            "alpha": self._alpha,
            "entropy": -log_prob.detach().mean(),
            "task_loss": task_loss,
            "task_masked": masked,
            "task_scale": task_scale,
            "task_count": counts,
            "task_q_max": per_task_abs_max(q_pred.detach(), task_id, self.num_tasks),
            "balancing_weight": balance,
        }
        if clipped is not None:
            out["task_clipped"] = per_task_mean(clipped.to(target.dtype), task_id, self.num_tasks)[0]
        if route is not None:
            depth, _ = per_task_mean(route_depth(route).float(), task_id, self.num_tasks)
            out["route_depth"] = torch.where(present, depth, torch.nan)
        return TensorDict(out, batch_size=[])

    def _per_sample_losses(
        self,
        terms: torch.Tensor,
        task_id: torch.Tensor,
        counts: torch.Tensor,
        scale: torch.Tensor,
        balance: torch.Tensor,
        weights: torch.Tensor | None,
        shape: torch.Size,
    ) -> TensorDictBase:
        """``reduction="none"``: sample ``i`` of task ``t`` contributes
        ``B scale_t (w_t) p_i x_i / n_t`` (``p_i`` its importance weight over the task's mean),
        so that the batch mean of each loss is the ``"mean"`` loss (with a stratified batch:
        ``(w_t) p_i x_i``)."""
        coefficient = task_id.numel() * scale[task_id] / counts[task_id]
        if weights is not None:
            coefficient = coefficient * weights
        alpha_i, actor_i, critic_i = terms * coefficient
        out = {
            "loss_alpha": alpha_i,
            "loss_actor": balance[task_id] * actor_i,
            "loss_qvalue": balance[task_id] * critic_i,
        }
        return TensorDict({key: value.reshape(shape) for key, value in out.items()}, batch_size=shape)

    def _critics(self, tensordict: TensorDictBase, params: TensorDictBase) -> TensorDictBase:
        """The twin critics with ``params`` stacked on dim 0 -> outputs ``[2, *B]``: under
        ``torch.vmap``, or (``deactivate_vmap``) one after the other. The loop is written
        here rather than taken from TorchRL's pseudo-vmap, which edits the pytree registry
        on every call and so makes ``torch.compile`` recompile the loss each time."""
        if not self.deactivate_vmap:
            own = TensorDict.from_module(self.qvalue_network)  # references, no copy
            try:
                return self._vmap_qnetworkN0(tensordict, params)
            except Exception:
                own.to_module(self.qvalue_network)  # a failed vmapped call leaves batched tensors behind
                raise
        outputs = []
        for member in params.unbind(0):
            with member.to_module(self.qvalue_network, preserve_module_state=False):
                outputs.append(self.qvalue_network(tensordict.copy()))
        return torch.stack(outputs)

    def _critic_terms(
        self, tensordict: TensorDictBase, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(Q_k(s, a) [2, B] with sampled routes, TD target y [B], critic loss per sample [B],
        clipped [B] bool or None)``: the loss is ``sum_k (Q_k - y)^2``, or for a categorical
        critic (a ``value_head``) ``sum_k`` of its cross-entropy against ``y``; ``clipped``
        flags the targets beyond ``td_target_bound`` (``None`` without one)."""
        with torch.no_grad():
            next_td = tensordict.get("next").select(*self.actor_network.in_keys, strict=False).copy()
            with set_exploration_type(ExplorationType.RANDOM), set_routing_mode(
                RoutingMode.TOPK
            ), self.actor_network_params.to_module(self.actor_network, preserve_module_state=False):
                next_action, next_log_prob = compute_rsample_log_prob(self.actor_network.get_dist(next_td))
            next_td.set(self.tensor_keys.action, next_action)
            for key in self.qvalue_network.in_keys:
                if key not in next_td.keys(True, True):
                    next_td.set(key, tensordict.get(("next", key)))
            with set_routing_mode(RoutingMode.TOPK):
                next_q = self._critics(next_td, self.target_qvalue_network_params)
            next_value = next_q.get(self.tensor_keys.state_action_value).squeeze(-1).min(0).values
            next_value = next_value - alpha * next_log_prob
            target_td = tensordict.select("next", strict=False).copy()
            target_td.set(("next", self.value_estimator.tensor_keys.value), next_value.unsqueeze(-1))
            if self.reward_normalization is not None:
                reward_key = ("next", self.value_estimator.tensor_keys.reward)
                task_id = flatten_task_id(tensordict.get(self.tensor_keys.task_id), tensordict.batch_size)
                target_td.set(reward_key, self.reward_normalization(target_td.get(reward_key), task_id))
            target = self.value_estimator.value_estimate(target_td).squeeze(-1)
            clipped = None if self.td_target_bound is None else target.abs() > self.td_target_bound
            target = clip_td_target(target, self.td_target_bound)
        with set_routing_mode(RoutingMode.SAMPLE):
            pred = self._critics(
                tensordict.select(*self.qvalue_network.in_keys, strict=False), self.qvalue_network_params
            )
        q_pred = pred.get(self.tensor_keys.state_action_value).squeeze(-1)
        value_head = getattr(self.qvalue_network, "value_head", None)
        if value_head is None:
            return q_pred, target, (q_pred - target).pow(2).sum(0), clipped
        return q_pred, target, value_head.cross_entropy(pred.get(VALUE_LOGITS_KEY), target).sum(0), clipped

    def _actor_terms(
        self, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(log pi(a~|s) [B], min_k Q_k(s, a~) [B], route replayed [B, L] or None)``."""
        actor_td = tensordict.select(*self.actor_network.in_keys, self.tensor_keys.route, strict=False).copy()
        with set_exploration_type(ExplorationType.RANDOM), set_routing_mode(
            RoutingMode.BEHAVIOUR
        ), self.actor_network_params.to_module(self.actor_network, preserve_module_state=False):
            action, log_prob = compute_rsample_log_prob(self.actor_network.get_dist(actor_td))
        q_td = tensordict.select(*self.qvalue_network.in_keys, strict=False).copy()
        q_td.set(self.tensor_keys.action, action)
        with set_routing_mode(RoutingMode.TOPK):
            q = self._critics(q_td, self._cached_detached_qvalue_params)
        min_q = q.get(self.tensor_keys.state_action_value).squeeze(-1).min(0).values
        route = actor_td.get(self.tensor_keys.route, None) if self.route_layout is not None else None
        if route is not None:
            route = self.route_layout.pad(route, fill=False)
        return log_prob, min_q, route


_LIVE_LOSSES: "weakref.WeakSet[MultiTaskSACLoss]" = weakref.WeakSet()


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimiser step hook: a loss whose ``log_alpha`` this optimiser holds caps it
    and refreshes the routing temperatures (:meth:`MultiTaskSACLoss.after_update`)."""
    if not _LIVE_LOSSES:
        return
    held = {id(param) for group in optimizer.param_groups for param in group["params"]}
    for loss in list(_LIVE_LOSSES):
        if id(loss.log_alpha) in held:
            loss.after_update()


register_optimizer_step_post_hook(_after_optimizer_step)
