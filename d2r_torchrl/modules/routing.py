"""Gate layout and route selection for Dynamic Depth Routing, vectorised over gates.

A D2R network with ``N`` modules has ``N`` gates: gate ``g`` (0-based, ``g < N - 1``)
feeds module ``g + 2`` (1-based) and chooses among the ``g + 1`` earlier modules;
the last gate feeds the output head and chooses among all ``N`` modules. The router
emits their logits flat, ``N(N+1)/2`` values in gate order (sizes 1, 2, ..., N). Here
they are padded into a ``[..., N, N]`` tensor whose row ``g`` holds gate ``g``'s
candidates in columns ``0..g`` and ``-inf`` elsewhere, so every gate is routed in one op.

Routing modes (see :class:`RoutingMode`):

* ``TOPK``: the ``k`` largest logits of each gate.
* ``SAMPLE``: ``k`` sources drawn without replacement from ``softmax(z / tau)``,
  implemented as top-k of ``z / tau + Gumbel`` noise.
* ``BEHAVIOUR``: the k-hot route stored with the transition; rows whose stored
  route is empty (no behaviour route was recorded) fall back to ``SAMPLE``.

Mixing weights are always the softmax of the *untempered* logits restricted to the
selected sources.
"""
from __future__ import annotations

import contextlib
import enum
import threading
from typing import Iterator, NamedTuple

import torch

from torchrl.envs.utils import ExplorationType, exploration_type

from d2r_torchrl.modules.native_chain import load_native_chain, runs_natively

__all__ = [
    "GateLayout",
    "RoutingMode",
    "routing_mode",
    "set_routing_mode",
    "select_routes",
    "select_sources",
    "route_slots",
    "RouteSlots",
    "gumbel_noise",
    "route_mask",
    "slot_weights",
    "slot_endorsement",
    "route_weights",
    "endorsement_mask",
    "route_depth",
    "modules_reached",
]


class RoutingMode(enum.Enum):
    """How a D2R network picks its route on the next call."""

    TOPK = "topk"
    SAMPLE = "sample"
    BEHAVIOUR = "behaviour"


_ROUTING_STATE = threading.local()


def routing_mode() -> RoutingMode:
    """The routing mode in force.

    An explicit :func:`set_routing_mode` context wins; otherwise TorchRL's exploration
    type decides as it does for a ``ProbabilisticActor``: ``RANDOM`` (or none set)
    samples routes, ``DETERMINISTIC``/``MODE``/``MEAN`` take the top-k.
    """
    mode = getattr(_ROUTING_STATE, "mode", None)
    if mode is not None:
        return mode
    if exploration_type() in (None, ExplorationType.RANDOM):
        return RoutingMode.SAMPLE
    return RoutingMode.TOPK


@contextlib.contextmanager
def set_routing_mode(mode: RoutingMode | str) -> Iterator[None]:
    """Context manager fixing the routing mode of every D2R network called inside it."""
    mode = RoutingMode(mode)
    previous = getattr(_ROUTING_STATE, "mode", None)
    _ROUTING_STATE.mode = mode
    try:
        yield
    finally:
        _ROUTING_STATE.mode = previous


class GateLayout(torch.nn.Module):
    """Index tables mapping flat router logits ``[..., N(N+1)/2]`` to padded ``[..., N, N]``.

    Buffers:
        pad_index: ``[N * N]`` long, flat position of (gate, source), ``N(N+1)/2`` (the
            appended fill value) where invalid.
        flat_index: ``[N(N+1)/2]`` long, positions of the valid entries in ``[N * N]``.
        valid: ``[N, N]`` bool, True where source ``j`` is a candidate of gate ``g``.
        num_candidates: ``[N]`` long, ``g + 1`` for each gate.
        endorse_threshold: ``[N]`` float, ``1 / (num_candidates + 1)`` (ResRouting).
        slot_valid: ``[N, k]`` bool, True for the first ``min(k, g + 1)`` slots of gate ``g``
            (the others are padding of gates with fewer than ``k`` candidates).
        last_source: ``[N, 1]`` long, ``g``: the last candidate of gate ``g``.
    """

    def __init__(self, num_modules: int, top_k: int) -> None:
        super().__init__()
        if num_modules < 1:
            raise ValueError(f"num_modules must be >= 1, got {num_modules}.")
        if not 1 <= top_k <= num_modules:
            raise ValueError(f"top_k must be in [1, num_modules={num_modules}], got {top_k}.")
        self.num_modules = num_modules
        self.top_k = top_k
        gate = torch.arange(num_modules).unsqueeze(1)
        source = torch.arange(num_modules).unsqueeze(0)
        valid = source <= gate
        flat_position = gate * (gate + 1) // 2 + source
        pad_index = torch.where(valid, flat_position, torch.full_like(source, self.num_logits)).flatten()
        num_candidates = torch.arange(1, num_modules + 1)
        self.register_buffer("pad_index", pad_index, persistent=False)
        self.register_buffer("flat_index", valid.flatten().nonzero().squeeze(-1), persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        self.register_buffer("num_candidates", num_candidates, persistent=False)
        self.register_buffer("endorse_threshold", 1.0 / (num_candidates + 1.0), persistent=False)
        slot_valid = torch.arange(top_k).unsqueeze(0) < num_candidates.unsqueeze(1)
        self.register_buffer("slot_valid", slot_valid, persistent=False)
        self.register_buffer("last_source", num_candidates.unsqueeze(1) - 1, persistent=False)

    @property
    def num_logits(self) -> int:
        return self.num_modules * (self.num_modules + 1) // 2

    def pad(self, flat: torch.Tensor, fill: float | bool = float("-inf")) -> torch.Tensor:
        """``[..., N(N+1)/2]`` -> ``[..., N, N]`` with ``fill`` at invalid positions.

        One ``index_select`` of the logits with a ``fill`` column appended (its backward is
        an ``index_add_``, cheaper than advanced indexing's accumulating ``index_put_``,
        and it has a vmap rule); ``test_pad_and_flatten_follow_the_gate_order`` checks it."""
        filler = flat.new_full((*flat.shape[:-1], 1), fill)
        padded = torch.cat([flat, filler], dim=-1).index_select(-1, self.pad_index)
        return padded.unflatten(-1, (self.num_modules, self.num_modules))

    def flatten(self, padded: torch.Tensor) -> torch.Tensor:
        """``[..., N, N]`` -> ``[..., N(N+1)/2]`` (inverse of :meth:`pad` on valid positions)."""
        return padded.flatten(-2)[..., self.flat_index]


def _topk_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the ``k`` largest scores per row in ascending order, ``[..., N, k]``.

    A row ``g`` with fewer than ``k`` valid (finite) candidates gets all of them, then
    columns ``> g`` (invalid). The order makes a replayed route sum its sources in the
    same order as the pass that chose it (bit-identical outputs).
    """
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)`` shaped like ``like`` (one uniform draw per entry)."""
    uniform = torch.rand_like(like).clamp_min(torch.finfo(like.dtype).tiny)
    return uniform.log().neg().log().neg()


def select_sources(
    logits: torch.Tensor,
    layout: GateLayout,
    mode: RoutingMode,
    temperature: torch.Tensor | None = None,
    behaviour: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sources of every gate as column indices, ``[..., N, k]`` long.

    Gate ``g``'s first ``min(k, g + 1)`` slots hold its selected sources in ascending order;
    the remaining (padding) slots hold columns ``> g``, which are not candidates (see
    ``GateLayout.slot_valid``).

    Args:
        logits: ``[..., N, N]`` padded logits (``-inf`` at invalid positions).
        layout: the gate layout.
        mode: routing mode.
        temperature: ``[...]`` per-sample routing temperature (``SAMPLE``/``BEHAVIOUR``).
        behaviour: ``[..., N(N+1)/2]`` bool stored route (``BEHAVIOUR``).
        noise: ``[..., N(N+1)/2]`` Gumbel noise for ``SAMPLE``/``BEHAVIOUR`` (drawn with
            :func:`gumbel_noise` when ``None``).
    """
    logits = logits.detach()
    if mode is RoutingMode.TOPK:
        return _topk_index(logits, layout.top_k)
    _check_sampling_inputs(mode, temperature, behaviour)
    if noise is None:  # drawn for the N(N+1)/2 candidates only, then padded with zeros (logits -inf there)
        noise = gumbel_noise(logits.flatten(-2)[..., : layout.num_logits])
    scores = layout.pad(noise, fill=0.0) + logits / temperature[..., None, None]
    sampled = _topk_index(scores, layout.top_k)
    if mode is RoutingMode.SAMPLE:
        return sampled
    behaviour = behaviour.bool()
    stored = _topk_index(layout.pad(behaviour, fill=False).to(logits.dtype), layout.top_k)
    has_route = behaviour.any(-1)[..., None, None]
    return torch.where(has_route, stored, sampled)


def _check_sampling_inputs(mode: RoutingMode, temperature: torch.Tensor | None, behaviour: torch.Tensor | None) -> None:
    if temperature is None:
        raise ValueError(f"routing mode {mode.value!r} needs a per-sample temperature.")
    if mode is RoutingMode.BEHAVIOUR and behaviour is None:
        raise ValueError("routing mode 'behaviour' needs the stored behaviour route.")


class RouteSlots(NamedTuple):
    """A D2R network's routes for one pass, in the chain's slot form (``L = N(N+1)/2``).

    * ``sources`` ``[..., N, k]`` long: the module each slot of each gate reads (ascending;
      a gate with fewer than ``k`` candidates repeats its last one in its padding slots);
    * ``weights`` ``[..., N, k]``: mixing weights, differentiable w.r.t. the logits (0 on
      padding slots);
    * ``endorsed`` ``[..., N, k]`` bool (ResRouting) or ``None``;
    * ``route`` ``[..., L]`` bool: the k-hot route in the router's flat order.
    """

    sources: torch.Tensor
    weights: torch.Tensor
    endorsed: torch.Tensor | None
    route: torch.Tensor


def route_slots(
    flat_logits: torch.Tensor,
    layout: GateLayout,
    mode: RoutingMode,
    temperature: torch.Tensor | None = None,
    behaviour: torch.Tensor | None = None,
    endorse: bool = False,
    native: bool = False,
) -> RouteSlots:
    """Every gate's route from the router's flat logits ``[..., L]`` (arguments as in
    :func:`select_sources`; ``endorse`` adds ResRouting's endorsement).

    What it computes, in the specification's dense form
    (:func:`~d2r_torchrl.modules.d2r_spec.dense_routes`): the weights and endorsement of the
    chosen route gathered at each gate's sources (``test_slot_weights_and_endorsement_equal_the_mask_forms``).
    PyTorch path: pad the logits to ``[..., N, N]``, then :func:`select_sources`,
    :func:`slot_weights`, :func:`slot_endorsement` and :func:`route_mask`. With ``native``,
    on CPU tensors outside ``torch.compile``, the extension's ``route_slots`` picks the
    sources, endorsement and route in one pass per sample without padding, and the weights
    are gathered from the flat logits; the Gumbel noise is drawn here either way, so both
    forms give the same routes (``test_native_route_slots_equal_the_plain_form``).
    """
    if mode is not RoutingMode.TOPK:
        _check_sampling_inputs(mode, temperature, behaviour)
    noise = None if mode is RoutingMode.TOPK else gumbel_noise(flat_logits.detach())
    behaviour = behaviour.bool() if mode is RoutingMode.BEHAVIOUR else None
    extension = load_native_chain() if native and runs_natively(flat_logits) else None
    if extension is not None:
        if noise is not None:  # one temperature per row, in the logits' dtype
            temperature = temperature.to(flat_logits.dtype).expand(flat_logits.shape[:-1])
        sources, positions, endorsed, route = _NativeRouteSlots.apply(
            flat_logits.detach(), temperature if noise is not None else None, noise, behaviour,
            layout, endorse, extension,
        )
        selected = flat_logits.gather(-1, positions.flatten(-2)).unflatten(-1, (layout.num_modules, layout.top_k))
        return RouteSlots(sources, _softmax_over_slots(selected, layout), endorsed if endorse else None, route)
    logits = layout.pad(flat_logits)
    index = select_sources(logits, layout, mode, temperature, behaviour, noise)
    return RouteSlots(
        torch.minimum(index, layout.last_source),
        slot_weights(logits, index, layout),
        slot_endorsement(logits, index, layout) if endorse else None,
        layout.flatten(route_mask(index, layout)),
    )


class _NativeRouteSlots(torch.autograd.Function):
    """The extension's ``route_slots`` over any leading shape (no gradient: its outputs are
    indices and masks), with a vmap rule that folds the vmapped dimension into the rows."""

    @staticmethod
    def forward(logits, temperature, noise, behaviour, layout, endorse, extension):  # type: ignore[override]
        rows = logits.shape[:-1]

        def flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.reshape(rows.numel(), *tensor.shape[len(rows):]).contiguous()

        outputs = extension.route_slots(
            flat(logits), flat(temperature), flat(noise), flat(behaviour), layout.num_modules, layout.top_k, endorse
        )
        return tuple(None if t is None else t.view(*rows, *t.shape[1:]) for t in outputs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(*(t for t in output if t is not None))

    @staticmethod
    def vmap(info, in_dims, logits, temperature, noise, behaviour, layout, endorse, extension):
        def batched(tensor: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if dim is None:
                return tensor.unsqueeze(0).expand(info.batch_size, *tensor.shape)
            return tensor.movedim(dim, 0)

        tensors = [batched(t, d) for t, d in zip((logits, temperature, noise, behaviour), in_dims[:4])]
        outputs = _NativeRouteSlots.apply(*tensors, layout, endorse, extension)
        return outputs, tuple(None if t is None else 0 for t in outputs)


def route_mask(index: torch.Tensor, layout: GateLayout) -> torch.Tensor:
    """``[..., N, k]`` source indices -> ``[..., N, N]`` bool k-hot route (padding slots dropped)."""
    mask = torch.zeros(*index.shape[:-1], layout.num_modules, dtype=torch.bool, device=index.device)
    return mask.scatter(-1, index, True) & layout.valid


def select_routes(
    logits: torch.Tensor,
    layout: GateLayout,
    mode: RoutingMode,
    temperature: torch.Tensor | None = None,
    behaviour: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose the sources of every gate as a mask: :func:`select_sources` as ``[..., N, N]``
    bool with ``min(k, g + 1)`` True entries in row ``g``."""
    return route_mask(select_sources(logits, layout, mode, temperature, behaviour), layout)


def slot_weights(logits: torch.Tensor, index: torch.Tensor, layout: GateLayout) -> torch.Tensor:
    """Mixing weights ``[..., N, k]``: the softmax of the gate's logits restricted to its
    selected sources (0 on padding slots). Equals :func:`route_weights` gathered at ``index``
    (``tests/test_routing_slots.py``).

    The softmax runs over a leading slot dimension (``movedim``): over a last dimension of
    only ``k`` entries PyTorch's CPU kernel is about 8x slower, forward and backward."""
    return _softmax_over_slots(logits.gather(-1, index), layout)


def _softmax_over_slots(selected: torch.Tensor, layout: GateLayout) -> torch.Tensor:
    """Softmax over each gate's ``k`` selected logits ``[..., N, k]``, padding slots excluded."""
    selected = selected.masked_fill(~layout.slot_valid, float("-inf"))
    return torch.softmax(selected.movedim(-1, 0), dim=0).movedim(0, -1)


def slot_endorsement(logits: torch.Tensor, index: torch.Tensor, layout: GateLayout) -> torch.Tensor:
    """ResRouting endorsement of each selected source, ``[..., N, k]`` bool: the
    :func:`endorsement_mask` gathered at ``index`` (False on padding slots;
    ``tests/test_routing_slots.py``)."""
    probs = torch.softmax(logits.detach(), dim=-1).gather(-1, index)
    return (probs > layout.endorse_threshold[:, None]) & layout.slot_valid


def route_weights(logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Softmax of ``logits`` restricted to ``selected`` (zero elsewhere), ``[..., N, N]``."""
    return torch.softmax(logits.masked_fill(~selected, float("-inf")), dim=-1)


def endorsement_mask(logits: torch.Tensor, layout: GateLayout) -> torch.Tensor:
    """ResRouting endorsement: ``softmax(z)_j > 1 / (n_g + 1)`` over each gate's candidates."""
    probs = torch.softmax(logits.detach(), dim=-1)
    return (probs > layout.endorse_threshold[:, None]) & layout.valid


def route_depth(selected: torch.Tensor) -> torch.Tensor:
    """Number of modules on the longest chain of a route, ``[..., N, N]`` bool -> ``[...]``.

    Module 1 has depth 1; module ``g + 2`` has depth ``1 +`` the deepest of its selected
    sources; the route's depth is the deepest source of the output gate.
    """
    num_modules = selected.shape[-1]
    depths = [torch.ones(selected.shape[:-2], dtype=torch.long, device=selected.device)]
    for gate in range(num_modules - 1):
        deepest = (torch.stack(depths, -1) * selected[..., gate, : gate + 1]).amax(-1)
        depths.append(deepest + 1)
    return (torch.stack(depths, -1) * selected[..., -1, :]).amax(-1)


def modules_reached(selected: torch.Tensor) -> torch.Tensor:
    """The modules a route runs, ``[..., N, N]`` bool -> ``[..., N]`` bool: those the output
    gate reads and, recursively, those a reached module reads (module 1 always).

    A module outside this set cannot change the output; the native CPU chain does not
    compute it (:mod:`~d2r_torchrl.modules.native_chain`). Gate ``g`` feeds module ``g + 2``,
    so walking the gates downwards settles a module before its sources are marked.
    """
    num_modules = selected.shape[-1]
    reached = selected[..., -1, :].clone()
    for gate in reversed(range(num_modules - 1)):
        reached |= selected[..., gate, :] & reached[..., gate + 1 : gate + 2]
    return reached
