"""TorchRL actor and critic built around the multi-task networks.

Keys (DESIGN.md): the actor reads ``observation`` ``[*B, obs]`` and ``task_id``
``[*B]``/``[*B, 1]`` and writes ``loc``/``scale`` ``[*B, A]``, ``action``,
``action_log_prob``; a D2R actor also writes ``("routing", "logits")`` and the route
it used, ``("routing", "path")`` ``[*B, N(N+1)/2]`` bool. Under
``set_routing_mode("behaviour")`` it instead *reads* that stored path. The critic
reads ``observation``, ``action``, ``task_id`` and writes ``state_action_value``
``[*B, 1]``.
"""
from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import TensorSpec
from torchrl.modules import ProbabilisticActor, TanhNormal

from d2r_torchrl import argument_checks as check
from d2r_torchrl.modules.baselines import SOFT_MODULAR_PRESETS, MultiTaskMLP, SoftModularNetwork
from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.modules.distributions import tanh_normal_class
from d2r_torchrl.modules.routing import RoutingMode, routing_mode
from d2r_torchrl.modules.task_conditioning import check_task_range
from d2r_torchrl.modules.value_heads import HLGaussValue

TASK_KEY = "task_id"
ROUTE_KEY = ("routing", "path")
ROUTE_LOGITS_KEY = ("routing", "logits")
VALUE_LOGITS_KEY = "state_action_value_logits"
LOG_STD_MAX = 2.0
# The smallest scale TorchRL's TanhNormal accepts is (strictly) above 1e-6; the reference's
# log-std floor of -20 (a scale of 2e-9) lies below it. TorchRL turns argument validation off,
# so such a scale would pass unchecked; the policy floors it at the first float32 value the
# declared constraint accepts instead (a log-std of about -13.8).
SCALE_MIN = torch.nextafter(
    torch.tensor(TanhNormal.arg_constraints["scale"].lower_bound, dtype=torch.float32), torch.tensor(1.0)
).item()

ARCHITECTURES = ("d2r", "soft_modular", "mt_sac", "mh_sac")


def make_network(
    architecture: str, in_features: int, num_tasks: int, out_features: int, **kwargs: Any
) -> nn.Module:
    """Build one multi-task network by name (see :data:`ARCHITECTURES`).

    ``kwargs`` go to the network class; ``soft_modular`` also accepts
    ``preset="shallow"`` (2x2x256) or ``"deep"`` (4x4x128).
    """
    for name, value in (("in_features", in_features), ("num_tasks", num_tasks), ("out_features", out_features)):
        check.positive_int(name, value)
    if architecture == "d2r":
        return D2RNetwork(in_features, num_tasks, out_features, **kwargs)
    if architecture == "soft_modular":
        preset = kwargs.pop("preset", "shallow")
        if preset not in SOFT_MODULAR_PRESETS:
            raise ValueError(
                f"Unknown Soft Modularization preset {preset!r}; accepted: {sorted(SOFT_MODULAR_PRESETS)}."
            )
        return SoftModularNetwork(
            in_features, num_tasks, out_features, **{**SOFT_MODULAR_PRESETS[preset], **kwargs}
        )
    if architecture in ("mt_sac", "mh_sac"):
        return MultiTaskMLP(
            in_features, num_tasks, out_features, multi_head=architecture == "mh_sac", **kwargs
        )
    raise ValueError(f"Unknown architecture {architecture!r}; accepted: {list(ARCHITECTURES)}.")


def parameter_count(architecture: str, in_features: int, num_tasks: int, out_features: int, **kwargs: Any) -> int:
    """The number of parameters of :func:`make_network` with these arguments; a D2R network is
    counted without being built (its size is set by ``num_modules`` and ``module_width``),
    the baselines, of fixed widths, are built on the meta device: neither allocates memory or
    draws from torch's generator, so counting leaves a seeded run's random stream as it was."""
    if architecture == "d2r":
        sizes = ("num_modules", "module_width", "encoder_widths", "router_widths")
        counted = {key: kwargs[key] for key in sizes if key in kwargs}
        return D2RNetwork.parameter_count(in_features, num_tasks, out_features, **counted)
    with torch.device("meta"):
        network = make_network(architecture, in_features, num_tasks, out_features, **kwargs)
    return sum(p.numel() for p in network.parameters())


def is_routed(module: nn.Module) -> bool:
    """True when ``module`` contains a D2R network."""
    return any(isinstance(m, D2RNetwork) for m in module.modules())


def d2r_networks(module: nn.Module) -> list[D2RNetwork]:
    return [m for m in module.modules() if isinstance(m, D2RNetwork)]


class _MultiTaskModule(TensorDictModuleBase):
    """Shared plumbing: runs ``network(features, task_id)`` and records routing.

    ``task_key`` (default ``"task_id"``) and ``route_key`` (default ``("routing", "path")``)
    are the keys read and written; :func:`set_multitask_keys` renames them.
    """

    def __init__(self, network: nn.Module) -> None:
        self.routed = isinstance(network, D2RNetwork)
        self.task_key: NestedKey = TASK_KEY
        self.route_key: NestedKey = ROUTE_KEY
        self.in_keys, self.out_keys = self._keys()
        super().__init__()
        self.network = network

    def _keys(self) -> tuple[list, list]:
        """``(in_keys, out_keys)`` under the current key names."""
        raise NotImplementedError

    def rename_keys(self, task_id: NestedKey | None = None, route: NestedKey | None = None) -> None:
        """Read the task index from ``task_id`` and the route from/to ``route`` (``None``: unchanged)."""
        self.task_key = task_id if task_id is not None else self.task_key
        self.route_key = route if route is not None else self.route_key
        self.in_keys, self.out_keys = self._keys()

    def _run(self, tensordict: TensorDictBase, features: torch.Tensor) -> torch.Tensor:
        task_id = tensordict.get(self.task_key)
        if not self.routed:
            return self.network(features, task_id)
        behaviour = None
        if routing_mode() is RoutingMode.BEHAVIOUR:
            behaviour = tensordict.get(self.route_key, None)
            if behaviour is None:
                raise KeyError(
                    f"Routing mode 'behaviour' needs the stored route {self.route_key} in the input; "
                    f"found keys {list(tensordict.keys(True, True))}."
                )
        out, logits, route = self.network(features, task_id, behaviour)
        self._write_routing(tensordict, logits, route)
        return out

    def _write_routing(self, tensordict: TensorDictBase, logits, route) -> None:
        pass


class PolicyParams(_MultiTaskModule):
    """Writes the TanhNormal parameters ``loc`` and ``scale = exp(min(log_std, 2))``, floored at
    :data:`SCALE_MIN` (TorchRL's smallest scale).

    A D2R policy also writes the router logits and the route it took.
    """

    def _keys(self) -> tuple[list, list]:
        routing = [ROUTE_LOGITS_KEY, self.route_key] if self.routed else []
        return ["observation", self.task_key], ["loc", "scale", *routing]

    def _write_routing(self, tensordict: TensorDictBase, logits, route) -> None:
        tensordict.set(ROUTE_LOGITS_KEY, logits)
        tensordict.set(self.route_key, route)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        check_task_range(tensordict.get(self.task_key), self.network.num_tasks)
        out = self._run(tensordict, tensordict.get("observation"))
        loc, log_std = out.chunk(2, dim=-1)
        tensordict.set("loc", loc)
        tensordict.set("scale", log_std.clamp(max=LOG_STD_MAX).exp().clamp(min=SCALE_MIN))
        return tensordict


class QValue(_MultiTaskModule):
    """``Q(s, a)`` from ``observation ⊕ action``; writes ``state_action_value`` ``[*B, 1]``.

    With a ``value_head`` (:class:`~d2r_torchrl.modules.value_heads.HLGaussValue`) the network
    outputs ``K`` logits, written to ``state_action_value_logits`` ``[*B, K]``, and
    ``state_action_value`` is their expected value.
    """

    def __init__(self, network: nn.Module, value_head: HLGaussValue | None = None) -> None:
        self.categorical = value_head is not None  # read by _keys, before the module is set up
        super().__init__(network)
        self.value_head = value_head

    def _keys(self) -> tuple[list, list]:
        logits = [VALUE_LOGITS_KEY] if self.categorical else []
        return ["observation", "action", self.task_key], ["state_action_value", *logits]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        features = torch.cat([tensordict.get("observation"), tensordict.get("action")], dim=-1)
        out = self._run(tensordict, features)
        if self.value_head is not None:
            tensordict.set(VALUE_LOGITS_KEY, out)
            out = self.value_head.value(out)
        tensordict.set("state_action_value", out)
        return tensordict


def set_multitask_keys(module: nn.Module, *, task_id: NestedKey | None = None, route: NestedKey | None = None) -> None:
    """Rename the task and route keys of every project actor/critic inside ``module`` (an actor,
    a critic or anything holding them) and refresh the ``in_keys``/``out_keys`` of the
    TensorDict sequences around them (``None``: unchanged)."""
    for child in module.modules():
        if isinstance(child, _MultiTaskModule):
            child.rename_keys(task_id, route)
    sequences = [m for m in module.modules() if isinstance(m, TensorDictSequential)]
    sequences += [m.__dict__["_det_part"] for m in sequences if m.__dict__.get("_det_part") is not None]
    for sequence in reversed(sequences):  # innermost first
        in_keys, out_keys = sequence._compute_in_and_out_keys(list(sequence.module))
        sequence.in_keys, sequence.out_keys = in_keys, out_keys
        sequence._complete_out_keys = list(out_keys)


def make_actor(
    architecture: str,
    observation_dim: int,
    action_spec: TensorSpec,
    num_tasks: int,
    log_prob: str = "exact",
    **network_kwargs: Any,
) -> ProbabilisticActor:
    """A ``ProbabilisticActor`` with a tanh-squashed Gaussian over ``action_spec``'s box, scored
    by ``log_prob``: ``"exact"`` (TorchRL's ``TanhNormal``) or ``"reference"`` (the authors'
    bounded tanh correction, :class:`~d2r_torchrl.modules.distributions.ReferenceTanhNormal`)."""
    check.positive_int("observation_dim", observation_dim)
    check.positive_int("num_tasks", num_tasks)
    if len(action_spec.shape) == 0 or action_spec.shape[-1] < 1:
        raise ValueError(f"action_spec must have a last dimension of size >= 1, got shape {tuple(action_spec.shape)}.")
    distribution_class = tanh_normal_class(log_prob)
    action_dim = action_spec.shape[-1]
    network = make_network(architecture, observation_dim, num_tasks, 2 * action_dim, **network_kwargs)
    params = PolicyParams(network)
    return ProbabilisticActor(
        params,
        in_keys=["loc", "scale"],
        spec=action_spec,
        distribution_class=distribution_class,
        distribution_kwargs={
            "low": action_spec.space.low,
            "high": action_spec.space.high,
            "tanh_loc": False,
        },
        return_log_prob=True,
    )


def make_critic(
    architecture: str,
    observation_dim: int,
    action_dim: int,
    num_tasks: int,
    value_head: HLGaussValue | None = None,
    **network_kwargs: Any,
) -> QValue:
    """One Q-network; the loss module makes the twin copy. ``network_kwargs`` go to the
    network, e.g. ``layer_norm=True`` (a LayerNorm after every hidden ``Linear``; for D2R
    those of its encoder and modules), which every architecture accepts. With ``value_head``
    the critic is categorical (see :class:`QValue`)."""
    for name, value in (("observation_dim", observation_dim), ("action_dim", action_dim), ("num_tasks", num_tasks)):
        check.positive_int(name, value)
    outputs = 1 if value_head is None else value_head.num_bins
    network = make_network(architecture, observation_dim + action_dim, num_tasks, outputs, **network_kwargs)
    return QValue(network, value_head)


def num_route_logits(module: nn.Module) -> int | None:
    """``N(N+1)/2`` of the first D2R network inside ``module``, or None if it has none."""
    networks = d2r_networks(module)
    return networks[0].layout.num_logits if networks else None
