"""Import the weights of the D2R authors' ``DepthRouteNet`` into a :class:`D2RNetwork`.

Reference key names (``L`` encoder layers, ``R`` router hidden layers, ``N`` modules)::

    base.fc{0..L-1}.{weight,bias}           state encoder      -> state_encoder.{0,2,..}
    em_base.fc0.{weight,bias}               task embedding     -> task_embedding
    depth_route_net.gates.{0..R}.{w,b}      router (R hidden)  -> router.0.{0,2,..}, router.1
    depth_route_net.module_fcs.{0..N-1}.*   modules            -> first_module, module_{weight,bias}[0..N-2]
    last.{weight,bias}                      output layer       -> head
    gumbel_temperature                      [T] temperatures   -> route_temperature (buffer)

The reference splits the router output in consecutive gates of sizes 1..N with
position ``j`` = source module ``j``, which is our :class:`GateLayout` order, so
every tensor is copied as is (modules ``2..N`` stacked in order).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from d2r_torchrl.modules.d2r import D2RNetwork

__all__ = ["load_reference_state_dict"]

_BASE = re.compile(r"base\.fc(\d+)\.weight")
_GATE = re.compile(r"depth_route_net\.gates\.(\d+)\.weight")


def _layer_count(keys: Mapping[str, torch.Tensor], pattern: re.Pattern[str]) -> int:
    """Number of consecutive layers ``0, 1, ...`` whose weight matches ``pattern``."""
    indices = {int(m.group(1)) for key in keys if (m := pattern.fullmatch(key))}
    count = 0
    while count in indices:
        count += 1
    return count


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, dims: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"Reference state dict is missing key {key!r}.")
    shape = tuple(state_dict[key].shape)
    if len(shape) != dims:
        raise ValueError(f"Reference key {key!r} has shape {shape}; expected {dims} dimensions.")
    return shape


def _modules_from_logits(num_logits: int, key: str) -> int:
    """``N`` such that ``N(N+1)/2 == num_logits``."""
    n = (math.isqrt(8 * num_logits + 1) - 1) // 2
    if n < 1 or n * (n + 1) // 2 != num_logits:
        raise ValueError(
            f"Reference key {key!r} has {num_logits} outputs, not a triangular number "
            "N(N+1)/2 of router logits."
        )
    return n


def load_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, top_k: int = 2, res_routing: bool = True
) -> D2RNetwork:
    """Build a :class:`D2RNetwork` shaped like a reference ``DepthRouteNet`` and load its weights.

    Sizes (input width, tasks, outputs, encoder/router widths, number and width of
    the modules) are read from the tensor shapes; ``top_k`` is not stored in the
    reference state dict. Raises ``ValueError`` naming the key on a missing or
    unexpected key or a shape that disagrees with the others.
    """
    encoder_layers = _layer_count(state_dict, _BASE)
    gate_layers = _layer_count(state_dict, _GATE)
    if encoder_layers == 0:
        raise ValueError("Reference state dict is missing key 'base.fc0.weight'.")
    if gate_layers == 0:
        raise ValueError("Reference state dict is missing key 'depth_route_net.gates.0.weight'.")
    last_gate = f"depth_route_net.gates.{gate_layers - 1}.weight"
    network = D2RNetwork(
        in_features=_shape(state_dict, "base.fc0.weight", 2)[1],
        num_tasks=_shape(state_dict, "em_base.fc0.weight", 2)[1],
        out_features=_shape(state_dict, "last.weight", 2)[0],
        num_modules=_modules_from_logits(_shape(state_dict, last_gate, 2)[0], last_gate),
        module_width=_shape(state_dict, "depth_route_net.module_fcs.0.weight", 2)[0],
        top_k=top_k,
        encoder_widths=tuple(
            _shape(state_dict, f"base.fc{i}.weight", 2)[0] for i in range(encoder_layers)
        ),
        router_widths=tuple(
            _shape(state_dict, f"depth_route_net.gates.{i}.weight", 2)[0]
            for i in range(gate_layers - 1)
        ),
        res_routing=res_routing,
    )

    prefixes = {f"base.fc{i}": f"state_encoder.{2 * i}" for i in range(encoder_layers)}
    prefixes["em_base.fc0"] = "task_embedding"
    prefixes.update(
        {f"depth_route_net.gates.{i}": f"router.0.{2 * i}" for i in range(gate_layers - 1)}
    )
    prefixes[f"depth_route_net.gates.{gate_layers - 1}"] = "router.1"
    prefixes.update(  # one key per module; the network's load pre-hook stacks modules 2..N
        {f"depth_route_net.module_fcs.{i}": f"blocks.{i}" for i in range(network.num_modules)}
    )
    prefixes["last"] = "head"
    renames = {"gumbel_temperature": "route_temperature"}
    for old, new in prefixes.items():
        renames.update({f"{old}.weight": f"{new}.weight", f"{old}.bias": f"{new}.bias"})

    expected = _per_module_shapes(network)
    unexpected = sorted(set(state_dict) - set(renames))
    if unexpected:
        raise ValueError(
            f"Reference state dict has unexpected key(s) {unexpected} for a network of "
            f"{network.num_modules} modules, {encoder_layers} encoder and {gate_layers} router "
            "layers."
        )
    converted = {}
    for old, new in renames.items():
        if old not in state_dict:
            raise ValueError(f"Reference state dict is missing key {old!r}.")
        tensor = state_dict[old]
        if tuple(tensor.shape) != tuple(expected[new]):
            raise ValueError(
                f"Reference key {old!r} has shape {tuple(tensor.shape)}; the other shapes "
                f"imply {tuple(expected[new])}."
            )
        converted[new] = tensor.detach()
    network.load_state_dict(converted)
    return network


def _per_module_shapes(network: D2RNetwork) -> dict[str, torch.Size]:
    """The network's state-dict shapes with its modules listed one by one as ``blocks.{i}``
    (the layout its load pre-hook stacks)."""
    shapes = {key: value.shape for key, value in network.state_dict().items()}
    for name in ("weight", "bias"):
        shapes[f"blocks.0.{name}"] = shapes.pop(f"first_module.{name}")
        stacked = shapes.pop(f"module_{name}")
        shapes.update({f"blocks.{i}.{name}": stacked[1:] for i in range(1, network.num_modules)})
    return shapes
