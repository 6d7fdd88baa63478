"""The D2R network's forward as METHOD.md section 2 writes it, ResRouting included: this
is the specification.

Given the route (which sources each gate reads, chosen as the routing modes say:
:func:`~d2r_torchrl.modules.routing.select_sources`), :func:`network_forward` runs the
encoders, router, module chain and head. Plain PyTorch, one gate after the other, with
every gate's mixing weights and endorsement as dense ``[*B, N, N]`` masks (row ``g`` is
the gate feeding module ``g + 2``, the last row the output gate; column ``j`` is module
``j + 1``). It works for any batch shape and under
:func:`torch.vmap`. :class:`~d2r_torchrl.modules.d2r.D2RNetwork` computes the same on its
fast paths, which the tests hold to this form:

* routing: :func:`~d2r_torchrl.modules.routing.route_slots` (slots instead of masks, and on
  the CPU a native pass) against :func:`dense_routes` (``tests/test_routing_slots.py``);
* the chain: :class:`~d2r_torchrl.modules.module_chain.ModuleChain` (hand-written backward,
  and on the CPU a native pass) against :func:`module_chain`
  (``tests/test_d2r_network.py``, ``tests/test_native_chain.py``).

This form itself is checked against the equations written out source by source
(``test_the_specification_follows_the_equations`` in ``tests/test_d2r_network.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from d2r_torchrl.modules.routing import GateLayout, endorsement_mask, route_weights
from d2r_torchrl.modules.task_conditioning import flatten_task_id

if TYPE_CHECKING:
    from d2r_torchrl.modules.d2r import D2RNetwork


def network_forward(
    net: "D2RNetwork", features: torch.Tensor, task_id: torch.Tensor, route: torch.Tensor
) -> torch.Tensor:
    """``out`` ``[*B, out]`` of ``net`` on ``features`` ``[*B, in]`` and ``task_id`` ``[*B]``
    along ``route`` ``[*B, L]`` bool, with ResRouting's gradients when ``net`` applies it
    (``res_routing``, training mode, gradients recorded)::

        h = state_encoder(s);  g = (We c + be) * h;  z = router(g)
        y^1 = relu(first_module(relu(h)));  x^out = module_chain(...);  out = head(x^out)

    (with the network's ``layer_norm``, ``y^1 = relu(LN(first_module(relu(h))))`` and the
    chain's modules normalised as :func:`module_chain` says).
    """
    state = net.state_encoder(features)
    logits = net.router(net.task_embedding(flatten_task_id(task_id, features.shape[:-1])) * state)
    res_routing = net.res_routing and net.training and torch.is_grad_enabled()
    weights, endorsed = dense_routes(logits, route, net.layout, res_routing)
    first = torch.relu(net.first_norm(net.first_module(torch.relu(state))))
    return net.head(module_chain(first, weights, endorsed, net.module_weight, net.module_bias, *net.module_norm()))


def dense_routes(
    flat_logits: torch.Tensor, route: torch.Tensor, layout: GateLayout, res_routing: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixing weights ``w`` ``[*B, N, N]`` (softmax of each gate's logits restricted to its
    route, 0 elsewhere) and, with ``res_routing``, the endorsement ``m`` ``[*B, N, N]`` bool
    (``softmax(z)_j > 1 / (n + 1)`` over the gate's ``n`` candidates), from the router's
    flat logits ``[*B, L]`` and the k-hot route ``[*B, L]`` bool (``L = N(N+1)/2``)."""
    logits = layout.pad(flat_logits)
    weights = route_weights(logits, layout.pad(route.bool(), fill=False))
    return weights, endorsement_mask(logits, layout) if res_routing else None


def _mix(weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[..., j] * outputs[..., j, :]``: ``[*B, n]`` and ``[*B, n, d]`` -> ``[*B, d]``."""
    return (weights.unsqueeze(-2) @ outputs).squeeze(-2)


def module_chain(
    first: torch.Tensor,
    weights: torch.Tensor,
    endorsed: torch.Tensor | None,
    module_weight: torch.Tensor,
    module_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Modules ``2..N`` and the output gate: ``x^out`` ``[*B, d]``.

    Args:
        first: ``y^1`` ``[*B, d]``.
        weights: ``w`` ``[*B, N, N]`` (see :func:`dense_routes`).
        endorsed: ``m`` ``[*B, N, N]`` bool for ResRouting, or ``None`` (plain gradients).
        module_weight, module_bias: ``[N - 1, d, d]`` and ``[N - 1, d]``, module ``i`` at ``i - 2``.
        norm_weight, norm_bias: ``[N - 1, d]`` each, or ``None``: when given, every module
            normalises its pre-activation, ``relu(LN(W^i x~^i + b^i))`` (gain and shift of
            module ``i`` at ``i - 2``).

    With ``y`` the module outputs and ``ybar`` their ResRouting copies (``ybar^1 = sg(y^1)``,
    ``ybar^i = sg(relu(W^i x~^i + b^i)) + x^i``), gate ``i`` computes::

        x^i  = sum_j w^i_j y^j
        x~^i = sum_j w^i_j [m^i_j y^j + (1 - m^i_j) ybar^j]     (x~ = x without ResRouting)
        y^i  = relu(W^i x~^i + b^i) + x^i

    and the output gate returns ``x~^out``. ``x~`` equals ``x`` in value; only the gradients
    differ.
    """
    num_modules = weights.shape[-1]
    y = first.unsqueeze(-2)  # [*B, i, d]: y^1 .. y^i
    y_bar = first.detach().unsqueeze(-2)
    if endorsed is not None:
        endorsed = endorsed.to(weights.dtype)
    for g in range(num_modules):
        w = weights[..., g, : g + 1]
        x = _mix(w, y)
        x_tilde = x
        if endorsed is not None:
            m = endorsed[..., g, : g + 1]
            x_tilde = _mix(w * m, y) + _mix(w * (1 - m), y_bar)
        if g == num_modules - 1:
            return x_tilde
        pre_activation = torch.nn.functional.linear(x_tilde, module_weight[g], module_bias[g])
        if norm_weight is not None:
            pre_activation = torch.nn.functional.layer_norm(
                pre_activation, pre_activation.shape[-1:], norm_weight[g], norm_bias[g]
            )
        activation = torch.relu(pre_activation)
        y = torch.cat([y, (activation + x).unsqueeze(-2)], dim=-2)
        y_bar = torch.cat([y_bar, (activation.detach() + x).unsqueeze(-2)], dim=-2)
    raise AssertionError("a chain has at least one gate")
