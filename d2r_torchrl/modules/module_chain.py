"""The routed chain of D2R modules ``2..N`` as one autograd function with a hand-written
backward: per gate in PyTorch (on CUDA, under ``torch.compile``) or, on the CPU, one native
pass per direction (:mod:`~d2r_torchrl.modules.native_chain`). Both compute what
:func:`d2r_torchrl.modules.d2r_spec.module_chain` specifies."""
from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

from d2r_torchrl.modules.native_chain import load_native_chain, runs_natively

NATIVE_BLOCK = 64  # samples per block of the native pass (benchmarks/RESULTS.md)


class GateRows(NamedTuple):
    """Where each gate reads in the module-major buffer ``[N * S, d]`` (``S = E * B``):
    member ``e``'s sample ``b`` reading source ``j`` is row ``j * S + e * B + b``.

    * ``rows`` ``[N, S * k]`` long and ``weight`` ``[N, S * k]``: each gate's sources and
      mixing weights, sample-major and contiguous (no gate copies them again);
    * ``offsets`` ``[S]``: where each sample's ``k`` slots start in a gate's row.
    """

    rows: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor


def gate_rows(index: torch.Tensor, weight: torch.Tensor) -> GateRows:
    """:class:`GateRows` of ``index`` and ``weight`` ``[N, E, B, k]``."""
    num_modules, members, batch, slots = index.shape
    samples = members * batch
    sample = torch.arange(samples, device=index.device).view(1, samples, 1)
    rows = index.reshape(num_modules, samples, slots) * samples + sample
    offsets = torch.arange(0, samples * slots, slots, device=index.device)
    return GateRows(rows.reshape(num_modules, -1), weight.reshape(num_modules, -1).contiguous(), offsets)


def read_sources(table: torch.Tensor, gates: GateRows, g: int) -> torch.Tensor:
    """Gate ``g``'s mixtures ``sum_r weight[s, r] * table[rows[s, r]]``, ``[S, d]``: one
    ``embedding_bag`` (gather and weighted sum fused). Under ``torch.compile`` a gather and a
    sum instead, which inductor fuses into one loop (it calls ``embedding_bag`` as an
    opaque operator, several kernels on CUDA)."""
    if torch.compiler.is_compiling():
        samples = len(gates.offsets)
        sources = table.index_select(0, gates.rows[g]).view(samples, -1, table.shape[-1])
        return (sources * gates.weight[g].view(samples, -1, 1)).sum(1)
    return torch.nn.functional.embedding_bag(
        gates.rows[g], table, gates.offsets, per_sample_weights=gates.weight[g], mode="sum"
    )


def send_back(
    table: torch.Tensor,
    gates: GateRows,
    g: int,
    endorsed_weight: torch.Tensor | None,
    grad_x: torch.Tensor | None,
    grad_x_tilde: torch.Tensor,
    grad_shortcut: torch.Tensor,
    grad_own: torch.Tensor | None,
) -> torch.Tensor:
    """Gate ``g``'s input gradients back to its sources; returns those of its mixing weights ``[S, k]``.

    ``grad_x`` ``[S, d]`` (``None`` at the output gate) is the plain mixture's gradient,
    ``grad_x_tilde`` the ResRouting mixture's. Both go, weighted, to the shortcut part of
    each source (``index_add_`` into ``grad_shortcut`` ``[N * S, d]``); with ResRouting
    (``grad_own`` given) the module's own part of a source gets ``grad_x`` and, where
    ``endorsed_weight`` ``[N, S * k]`` (weight times endorsement) is non-zero, ``grad_x_tilde``.
    """
    samples, width = grad_x_tilde.shape
    row, weight = gates.rows[g], gates.weight[g].view(samples, -1, 1)
    both = grad_x_tilde if grad_x is None else grad_x + grad_x_tilde
    sources = table.index_select(0, row).view(samples, -1, width)  # [S, k, d]
    grad_weight = torch.bmm(sources, both.unsqueeze(-1)).squeeze(-1)
    grad_shortcut.index_add_(0, row, (weight * both.unsqueeze(1)).view(-1, width))
    if grad_own is not None:
        own = endorsed_weight[g].view(samples, -1, 1) * grad_x_tilde.unsqueeze(1)
        if grad_x is not None:
            own = torch.addcmul(own, weight, grad_x.unsqueeze(1))
        grad_own.index_add_(0, row, own.view(-1, width))
    return grad_weight


def backward_gate(
    table: torch.Tensor,
    gates: GateRows,
    g: int,
    endorsed_weight: torch.Tensor | None,
    active: torch.Tensor,
    matrix: torch.Tensor,
    grad_shortcut: torch.Tensor,
    grad_own: torch.Tensor | None,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward through module ``g + 2`` (mask ``active`` ``[E, B, d]``) and gate ``g``, which
    feeds it (see :func:`send_back`): returns the gradients of the gate's mixing weights
    ``[S, k]``, and of the module's bias ``[E, d]`` and weight ``[E, d, d]`` (``None`` unless
    ``need_params``). The module's rows of the gradient buffers are read as views: no gate
    at or before ``g`` writes them."""
    members, batch, width = active.shape
    samples = members * batch
    module = slice((g + 1) * samples, (g + 2) * samples)
    x = read_sources(table, gates, g).view(members, batch, width)  # recomputed: cheaper than kept
    grad_y = (grad_shortcut if grad_own is None else grad_own)[module]
    grad_pre = grad_y.view(members, batch, width) * active
    grad_bias = grad_pre.sum(1) if need_params else None
    grad_matrix = torch.bmm(grad_pre.transpose(1, 2), x) if need_params else None
    grad_x_tilde = torch.bmm(grad_pre, matrix).view(-1, width)
    grad_weight = send_back(
        table, gates, g, endorsed_weight, grad_shortcut[module], grad_x_tilde, grad_shortcut, grad_own
    )
    return grad_weight, grad_bias, grad_matrix


class ModuleChain(torch.autograd.Function):
    """Modules ``2..N`` and the output gate of an ensemble of ``E`` networks, with a
    hand-written backward.

    What it computes, for each member ``e`` and sample ``b``, is
    :func:`~d2r_torchrl.modules.d2r_spec.module_chain` with the dense weights and
    endorsement scattered from these slots::

        y_1 = first;  for g = 1..N-1:  x_g = sum_r weight[g, r] y_{index[g, r]}
                                       y_{g+1} = relu(W_g x_g + b_g) + x_g
        output = sum_r weight[N, r] y_{index[N, r]}

    with ResRouting's gradient paths: a gate's read of source ``j`` passes the gradient of
    the plain mixture ``x`` to all of ``y_j`` and that of the ResRouting mixture ``x~``
    (equal in value) to ``y_j`` when ``endorsed``, else only to the shortcut part ``x_j`` of
    ``y_j = a_j + x_j`` (``y_1 = a_1`` has none). The tests
    ``test_chain_paths_match_the_specification`` (float64, both passes, several members;
    ``tests/test_native_chain.py``), ``test_gradients_match_a_gate_by_gate_implementation``
    (the whole network) and ``test_vmapped_critic_ensemble_matches_each_critic`` hold it to
    that form.

    Plain autograd needs, at every gate, one tensor holding all earlier module outputs to
    pick each sample's sources from (``O(N^2)`` copies per pass: the specification's chain
    dispatches 1.85x the kernels and takes 2.7x the time on the CPU,
    ``benchmarks/bench_chain_forms.py``). Here the outputs live in
    one module-major buffer ``[N * E * B, d]`` that each gate reads with one
    ``embedding_bag`` (gather and weighted sum fused). The backward keeps only that buffer
    and the ReLU masks, recomputes each module's input ``x``, walks the chain in reverse and
    sends gradients back with one ``index_add_`` per gate and gradient part. The members'
    linear maps are batched matrix products, so twin critics run as one chain; under
    :func:`torch.vmap` the vmapped dimension is folded into the ensemble (see :meth:`vmap`).
    With ``native`` (the extension, for CPU tensors outside ``torch.compile``), both passes
    run in C++ instead, blocked over samples, and compute only the modules each sample's
    route reaches (:func:`~d2r_torchrl.modules.routing.modules_reached`): the others cannot
    change the output, and their rows of the returned buffers are left unset.

    Inputs (``S = E * B`` samples, ``k`` slots per gate):

    * ``first`` ``[E, B, d]``: ``y_1``;
    * ``index`` ``[N, E, B, k]`` long: each gate's sources (``<=`` the gate's last
      candidate); ``weight`` ``[N, E, B, k]``: their mixing weights; ``endorsed``
      ``[N, E, B, k]`` or ``None``: 1 where ResRouting endorses the source (``None``
      without ResRouting);
    * ``native``: the native extension, or ``None`` for the PyTorch path;
    * ``module_weight`` ``[E, N - 1, d, d]`` and ``module_bias`` ``[E, N - 1, d]``: modules
      ``2..N`` stacked (module ``g + 2`` of member ``e`` at ``[e, g]``).

    Returns the output mixture ``[E, B, d]`` and, for the backward only, the module outputs
    ``y`` ``[N * S, d]`` and ReLU masks ``W_g x_g + b_g > 0`` ``[N - 1, E, B, d]`` bool.
    """

    @staticmethod
    def forward(first, index, weight, endorsed, native, module_weight, module_bias):  # type: ignore[override]
        members, batch, width = first.shape
        num_modules = index.shape[0]
        if native is not None:
            mixed, table, active = native.forward(
                first, index.contiguous(), weight.contiguous(), module_weight, module_bias, NATIVE_BLOCK
            )
            return mixed, table.view(-1, width), active
        gates = gate_rows(index, weight)
        outputs = torch.empty((num_modules, members, batch, width), dtype=first.dtype, device=first.device)
        active = torch.empty(outputs[1:].shape, dtype=torch.bool, device=first.device)
        outputs[0] = first
        table = outputs.view(-1, width)
        for g in range(num_modules - 1):
            x = read_sources(table, gates, g).view(members, batch, width)
            y = outputs[g + 1]
            torch.baddbmm(module_bias[:, g].unsqueeze(1), x, module_weight[:, g].transpose(1, 2), out=y)
            torch.gt(y, 0, out=active[g])
            y.relu_().add_(x)
        mixed = read_sources(table, gates, num_modules - 1).view(members, batch, width)
        return mixed, table, active

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, index, weight, endorsed, native, module_weight, _ = inputs
        _, table, active = output
        ctx.native = native
        ctx.mark_non_differentiable(table, active)
        ctx.set_materialize_grads(False)
        ctx.res_routing = endorsed is not None
        saved_endorsed = endorsed if endorsed is not None else torch.empty(0, dtype=weight.dtype, device=weight.device)
        ctx.save_for_backward(index, weight, saved_endorsed, table, active, module_weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mixed, *_):  # type: ignore[override]
        index, weight, endorsed, table, active, module_weight = ctx.saved_tensors
        num_modules, members, batch, slots = index.shape
        width = table.shape[-1]
        need_params = any(ctx.needs_input_grad[5:7])  # False when the parameters are detached
        if ctx.native is not None:
            grad_first, grad_weight, grad_module_weight, grad_module_bias = ctx.native.backward(
                grad_mixed, index.contiguous(), weight.contiguous(),
                endorsed.contiguous() if ctx.res_routing else None,
                table.view(num_modules, members, batch, width), active, module_weight,
                need_params, NATIVE_BLOCK,
            )
            return grad_first, None, grad_weight, None, None, grad_module_weight, grad_module_bias
        gates = gate_rows(index, weight)
        # d loss / d x_j (the shortcut part of y_j) and d loss / d a_j (the module's own
        # part), rows as in ``table``; without ResRouting the shortcut buffer holds both
        grad_shortcut = torch.zeros_like(table)
        grad_own = torch.zeros_like(table) if ctx.res_routing else None
        endorsed_weight = gates.weight * endorsed.reshape(num_modules, -1) if ctx.res_routing else None
        grad_weight = [  # per gate [S, k], last gate first
            send_back(
                table, gates, num_modules - 1, endorsed_weight, None, grad_mixed.reshape(-1, width),
                grad_shortcut, grad_own,
            )
        ]
        grad_matrices, grad_biases = [], []  # per module, last first
        for g in reversed(range(num_modules - 1)):
            grad_w, grad_bias, grad_matrix = backward_gate(
                table, gates, g, endorsed_weight, active[g], module_weight[:, g], grad_shortcut, grad_own, need_params
            )
            grad_weight.append(grad_w)
            grad_matrices.append(grad_matrix)
            grad_biases.append(grad_bias)
        grad_first = (grad_shortcut if grad_own is None else grad_own)[: members * batch]
        return (
            grad_first.view(members, batch, width),
            None,
            torch.stack(grad_weight[::-1]).view(num_modules, members, batch, slots),
            None,
            None,
            _stack_modules(grad_matrices[::-1], module_weight) if need_params else None,
            _stack_modules(grad_biases[::-1], module_weight[..., 0]) if need_params else None,
        )

    @staticmethod
    def vmap(info, in_dims, first, index, weight, endorsed, native, module_weight, module_bias):
        """Fold the vmapped dimension ``V`` into the ensemble: ``E -> V * E``."""
        size = info.batch_size

        def fold(tensor: torch.Tensor | None, dim: int | None, ensemble_dim: int) -> torch.Tensor | None:
            if tensor is None:
                return None
            if dim is None:
                tensor = tensor.unsqueeze(0).expand(size, *tensor.shape)
                dim = 0
            tensor = tensor.movedim(dim, ensemble_dim)
            return tensor.flatten(ensemble_dim, ensemble_dim + 1)

        folded_index = fold(index, in_dims[1], 1)  # [N, V * E, B, k]
        mixed, table, active = ModuleChain.apply(
            fold(first, in_dims[0], 0),
            folded_index,
            fold(weight, in_dims[2], 1),
            fold(endorsed, in_dims[3], 1),
            native,
            fold(module_weight, in_dims[5], 0),
            fold(module_bias, in_dims[6], 0),
        )
        # the buffers' sample dimensions are (V * E * B) or (V * E): split V back out of them
        table = table.view(folded_index.shape[0], size, -1, table.shape[-1])
        return (mixed.unflatten(0, (size, -1)), table, active.unflatten(1, (size, -1))), (0, 1, 1)


def run_chain(
    first: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    endorsed: torch.Tensor | None,
    module_weight: torch.Tensor,
    module_bias: torch.Tensor,
    native: bool = False,
) -> torch.Tensor:
    """:class:`ModuleChain`'s output mixture ``[E, B, d]`` (shapes as documented there); with
    ``native``, the native passes where they can run (:func:`runs_natively`; a warning
    once, and the PyTorch path, where the extension cannot be built)."""
    extension: ModuleType | None = load_native_chain() if native and runs_natively(first) else None
    return ModuleChain.apply(first, index, weight, endorsed, extension, module_weight, module_bias)[0]


def _stack_modules(per_module: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-module gradients ``[E, ...]`` -> ``[E, N - 1, ...]`` (shaped as ``like`` when ``N = 1``)."""
    return torch.stack(per_module, dim=1) if per_module else torch.zeros_like(like)
