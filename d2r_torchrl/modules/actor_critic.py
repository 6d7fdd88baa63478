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
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.data import TensorSpec
from torchrl.modules import ProbabilisticActor, TanhNormal

from d2r_torchrl import argument_checks as check
from d2r_torchrl.modules.baselines import SOFT_MODULAR_PRESETS, MultiTaskMLP, SoftModularNetwork
from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.modules.routing import RoutingMode, routing_mode
from d2r_torchrl.modules.task_conditioning import check_task_range

ROUTE_KEY = ("routing", "path")
ROUTE_LOGITS_KEY = ("routing", "logits")
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

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
    the baselines, of fixed widths, are built."""
    if architecture == "d2r":
        sizes = ("num_modules", "module_width", "encoder_widths", "router_widths")
        counted = {key: kwargs[key] for key in sizes if key in kwargs}
        return D2RNetwork.parameter_count(in_features, num_tasks, out_features, **counted)
    network = make_network(architecture, in_features, num_tasks, out_features, **kwargs)
    return sum(p.numel() for p in network.parameters())


def is_routed(module: nn.Module) -> bool:
    """True when ``module`` contains a D2R network."""
    return any(isinstance(m, D2RNetwork) for m in module.modules())


def d2r_networks(module: nn.Module) -> list[D2RNetwork]:
    return [m for m in module.modules() if isinstance(m, D2RNetwork)]


class _MultiTaskModule(TensorDictModuleBase):
    """Shared plumbing: runs ``network(features, task_id)`` and records routing."""

    def __init__(self, network: nn.Module, in_keys: list, out_keys: list) -> None:
        self.routed = isinstance(network, D2RNetwork)
        if self.routed:
            out_keys = out_keys + self._routing_out_keys()
        self.in_keys = in_keys
        self.out_keys = out_keys
        super().__init__()
        self.network = network

    def _routing_out_keys(self) -> list:
        return []

    def _run(self, tensordict: TensorDictBase, features: torch.Tensor) -> torch.Tensor:
        task_id = tensordict.get("task_id")
        if not self.routed:
            return self.network(features, task_id)
        behaviour = None
        if routing_mode() is RoutingMode.BEHAVIOUR:
            behaviour = tensordict.get(ROUTE_KEY, None)
            if behaviour is None:
                raise KeyError(
                    f"Routing mode 'behaviour' needs the stored route {ROUTE_KEY} in the input; "
                    f"found keys {list(tensordict.keys(True, True))}."
                )
        out, logits, route = self.network(features, task_id, behaviour)
        self._write_routing(tensordict, logits, route)
        return out

    def _write_routing(self, tensordict: TensorDictBase, logits, route) -> None:
        pass


class PolicyParams(_MultiTaskModule):
    """Writes the TanhNormal parameters ``loc`` and ``scale`` (log-std clamped to [-20, 2]).

    A D2R policy also writes the router logits and the route it took.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__(network, ["observation", "task_id"], ["loc", "scale"])

    def _routing_out_keys(self) -> list:
        return [ROUTE_LOGITS_KEY, ROUTE_KEY]

    def _write_routing(self, tensordict: TensorDictBase, logits, route) -> None:
        tensordict.set(ROUTE_LOGITS_KEY, logits)
        tensordict.set(ROUTE_KEY, route)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        check_task_range(tensordict.get("task_id"), self.network.num_tasks)
        out = self._run(tensordict, tensordict.get("observation"))
        loc, log_std = out.chunk(2, dim=-1)
        tensordict.set("loc", loc)
        tensordict.set("scale", log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp())
        return tensordict


class QValue(_MultiTaskModule):
    """``Q(s, a)`` from ``observation ⊕ action``; writes ``state_action_value`` ``[*B, 1]``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__(network, ["observation", "action", "task_id"], ["state_action_value"])

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        features = torch.cat([tensordict.get("observation"), tensordict.get("action")], dim=-1)
        tensordict.set("state_action_value", self._run(tensordict, features))
        return tensordict


def make_actor(
    architecture: str,
    observation_dim: int,
    action_spec: TensorSpec,
    num_tasks: int,
    **network_kwargs: Any,
) -> ProbabilisticActor:
    """A ``ProbabilisticActor`` with a TanhNormal over ``action_spec``'s box."""
    check.positive_int("observation_dim", observation_dim)
    check.positive_int("num_tasks", num_tasks)
    if len(action_spec.shape) == 0 or action_spec.shape[-1] < 1:
        raise ValueError(f"action_spec must have a last dimension of size >= 1, got shape {tuple(action_spec.shape)}.")
    action_dim = action_spec.shape[-1]
    network = make_network(architecture, observation_dim, num_tasks, 2 * action_dim, **network_kwargs)
    params = PolicyParams(network)
    return ProbabilisticActor(
        params,
        in_keys=["loc", "scale"],
        spec=action_spec,
        distribution_class=TanhNormal,
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
    **network_kwargs: Any,
) -> QValue:
    """One Q-network; the loss module makes the twin copy."""
    for name, value in (("observation_dim", observation_dim), ("action_dim", action_dim), ("num_tasks", num_tasks)):
        check.positive_int(name, value)
    network = make_network(architecture, observation_dim + action_dim, num_tasks, 1, **network_kwargs)
    return QValue(network)


def num_route_logits(module: nn.Module) -> int | None:
    """``N(N+1)/2`` of the first D2R network inside ``module``, or None if it has none."""
    networks = d2r_networks(module)
    return networks[0].layout.num_logits if networks else None
