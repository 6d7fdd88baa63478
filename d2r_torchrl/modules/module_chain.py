"""The routed chain of D2R modules ``2..N`` as one autograd function with a hand-written
backward, and the kernels it runs: per gate (eager, or compiled with ``torch.compile``) or,
on the CPU, one native pass per direction (:mod:`~d2r_torchrl.modules.native_chain`)."""
from __future__ import annotations

import warnings
from types import ModuleType
from typing import Callable

import torch
# inductor's InductorError is a BackendCompilerFailed
from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit

from d2r_torchrl.modules.native_chain import load_native_chain, runs_natively


def flat_rows(index: torch.Tensor) -> torch.Tensor:
    """``[N, E, B, k]`` sources -> rows ``[N, E * B, k]`` of the flattened ``[N * E * B, d]``
    buffer: member ``e``'s sample ``b`` reading source ``j`` is row ``j * E * B + e * B + b``."""
    samples = index.shape[1] * index.shape[2]
    sample = torch.arange(samples, device=index.device).view(1, samples, 1)
    return index.flatten(1, 2) * samples + sample


def read_sources(table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_r weight[:, r] * table[rows[:, r]]`` for ``rows``/``weight`` ``[S, k]``: ``[S, d]``."""
    return torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weight, mode="sum")


def send_back(
    table: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    endorsed_weight: torch.Tensor | None,
    grad_x: torch.Tensor | None,
    grad_x_tilde: torch.Tensor,
    grad_shortcut: torch.Tensor,
    grad_own: torch.Tensor | None,
) -> torch.Tensor:
    """A gate's input gradients back to its sources; returns those of its mixing weights ``[S, k]``.

    ``grad_x`` ``[S, d]`` (``None`` at the output gate) is the plain mixture's gradient,
    ``grad_x_tilde`` the ResRouting mixture's. Both go, weighted, to the shortcut part of
    each source (``index_add_`` into ``grad_shortcut`` ``[N * S, d]``); with ResRouting
    (``grad_own`` given) the module's own part of a source gets ``grad_x`` and, where
    ``endorsed_weight`` ``[S, k]`` (weight times endorsement) is non-zero, ``grad_x_tilde``.
    """
    slots, width = rows.shape[-1], table.shape[-1]
    row = rows.flatten()
    both = grad_x_tilde if grad_x is None else grad_x + grad_x_tilde
    sources = table.index_select(0, row).view(-1, slots, width)
    grad_weight = (sources * both.unsqueeze(1)).sum(-1)
    grad_shortcut.index_add_(0, row, (weight[..., None] * both.unsqueeze(1)).flatten(0, 1))
    if grad_own is not None:
        own = endorsed_weight[..., None] * grad_x_tilde.unsqueeze(1)
        if grad_x is not None:
            own = torch.addcmul(own, weight[..., None], grad_x.unsqueeze(1))
        grad_own.index_add_(0, row, own.flatten(0, 1))
    return grad_weight


def backward_gate(
    table: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    endorsed_weight: torch.Tensor | None,
    active: torch.Tensor,
    matrix: torch.Tensor,
    module_rows: torch.Tensor,
    grad_shortcut: torch.Tensor,
    grad_own: torch.Tensor | None,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward through module ``g + 1`` (rows ``module_rows`` of the buffers, mask
    ``active`` ``[E, B, d]``) and gate ``g`` (see :func:`send_back`): returns the gradients
    of the gate's mixing weights ``[S, k]``, and of the module's bias ``[E, d]`` and weight
    ``[E, d, d]`` (``None`` unless ``need_params``)."""
    members, batch, width = active.shape
    x = read_sources(table, rows, weight).view(members, batch, width)  # recomputed: cheaper than kept
    grad_y = (grad_shortcut if grad_own is None else grad_own).index_select(0, module_rows)
    grad_pre = grad_y.view(members, batch, width) * active
    grad_bias = grad_pre.sum(1) if need_params else None
    grad_matrix = torch.bmm(grad_pre.transpose(1, 2), x) if need_params else None
    grad_x_tilde = torch.bmm(grad_pre, matrix).view(-1, width)
    grad_x = grad_shortcut.index_select(0, module_rows)
    grad_weight = send_back(table, rows, weight, endorsed_weight, grad_x, grad_x_tilde, grad_shortcut, grad_own)
    return grad_weight, grad_bias, grad_matrix


RECOMPILE_LIMIT = 64
NATIVE_BLOCK = 64  # samples per block of the native pass (benchmarks/RESULTS.md)


class _CompiledOrEager:
    """``torch.compile(fn)`` (one graph; sizes become dynamic once a second one is seen); if
    compiling fails (no C++ compiler for the CPU backend, say, or too many recompiles) it
    warns once and runs ``fn`` itself from then on."""

    def __init__(self, fn: Callable, backend: str | Callable) -> None:
        self.fn = fn
        self.compiled: Callable | None = torch.compile(fn, fullgraph=True, backend=backend)

    def __call__(self, *args):
        if self.compiled is not None and not torch.compiler.is_compiling():  # inside a compiled update: traced inline
            try:
                # one graph per dtype, ResRouting on/off and parameter gradients on/off, and sizes
                # turn dynamic once they change: a process with many networks can exceed 8
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return self.compiled(*args)
            except (BackendCompilerFailed, FailOnRecompileLimitHit) as error:
                warnings.warn(f"D2R chain kernels run eagerly: compiling {self.fn.__name__} failed ({error})")
                self.compiled = None
        return self.fn(*args)


class ChainKernels:
    """What :class:`ModuleChain` runs.

    * ``native``: the compiled extension of :mod:`~d2r_torchrl.modules.native_chain` (or
      ``None``), which runs a whole CPU pass in C++ blocked over samples; used for CPU
      tensors outside ``torch.compile`` (``tests/test_native_chain.py`` checks it against
      the per-gate path below).
    * otherwise the per-gate kernels of the backward, :func:`backward_gate` and
      :func:`send_back`: eager (``compiled=False``) or each compiled with ``torch.compile``,
      which fuses a gate's gathers, products and scatters into a few loops
      (``test_gradients_match_a_gate_by_gate_implementation[compiled_kernels]`` checks them
      against the plain per-gate form). That forward stays eager: compiled, its in-place
      writes to the shared output buffer cost more than the fusion saves.
    """

    def __init__(self, compiled: bool, backend: str | Callable = "inductor", native: ModuleType | None = None) -> None:
        wrap = (lambda fn: _CompiledOrEager(fn, backend)) if compiled else (lambda fn: fn)
        self.backward_gate = wrap(backward_gate)
        self.send_back = wrap(send_back)
        self.native = native

    def native_for(self, tensor: torch.Tensor) -> ModuleType | None:
        """The native extension if it can run on ``tensor`` here (see :func:`runs_natively`)."""
        return self.native if self.native is not None and runs_natively(tensor) else None


EAGER_KERNELS = ChainKernels(compiled=False)
_shared_kernels: dict[tuple[bool, bool], ChainKernels] = {(False, False): EAGER_KERNELS}


def chain_kernels(compiled: bool, native: bool = False) -> ChainKernels:
    """The shared kernels: per-gate ones eager or ``compiled``, and with ``native`` the CPU
    extension in front of them (each built once, on first use; a native extension that
    cannot be built leaves the per-gate path after a warning)."""
    key = (compiled, native)
    if key not in _shared_kernels:
        _shared_kernels[key] = ChainKernels(compiled=compiled, native=load_native_chain() if native else None)
    return _shared_kernels[key]


class ModuleChain(torch.autograd.Function):
    """Modules ``2..N`` and the output gate of an ensemble of ``E`` networks, with a
    hand-written backward.

    Plain form (what it computes, for each member ``e`` and sample ``b``)::

        y_1 = first;  for g = 1..N-1:  x_g = sum_r weight[g, r] y_{index[g, r]}
                                       y_{g+1} = relu(W_g x_g + b_g) + x_g
        output = sum_r weight[N, r] y_{index[N, r]}

    with ResRouting's gradient paths (METHOD.md section 2): a gate's read of source ``j``
    passes the gradient of the plain mixture ``x`` to all of ``y_j`` and that of the
    ResRouting mixture ``x~`` (equal in value) to ``y_j`` when ``endorsed``, else only to the
    shortcut part ``x_j`` of ``y_j = a_j + x_j`` (``y_1 = a_1`` has none). The tests
    ``test_gradients_match_a_gate_by_gate_implementation`` (per-gate autograd, float64) and
    ``test_vmapped_critic_ensemble_matches_each_critic`` check it against that form.

    Plain autograd would need, at every gate, one tensor holding all earlier module outputs
    to pick each sample's sources from (``O(N^2)`` copies per pass). Here the outputs live
    in one module-major buffer ``[N * E * B, d]`` that each gate reads with one
    ``embedding_bag`` (gather and weighted sum fused). The backward keeps only that buffer
    and the ReLU masks, recomputes each module's input ``x``, walks the chain in reverse and
    sends gradients back with one ``index_add_`` per gate. The members' linear maps are
    batched matrix products, so twin critics run as one chain; under :func:`torch.vmap` the
    vmapped dimension is folded into the ensemble (see :meth:`vmap`). On the CPU, with
    ``kernels.native``, both passes run in the C++ extension instead, blocked over samples
    (same inputs, outputs and gradients; ``tests/test_native_chain.py``), and compute only
    the modules each sample's route reaches
    (:func:`~d2r_torchrl.modules.routing.modules_reached`): the others cannot change the
    output, and their rows of the returned buffers are left unset.

    Inputs (``S = E * B`` samples, ``k`` slots per gate):

    * ``first`` ``[E, B, d]``: ``y_1``;
    * ``index`` ``[N, E, B, k]`` long: each gate's sources (``<=`` the gate's last
      candidate); ``weight`` ``[N, E, B, k]``: their mixing weights; ``endorsed``
      ``[N, E, B, k]`` or ``None``: 1 where ResRouting endorses the source (``None``
      without ResRouting);
    * ``kernels``: the :class:`ChainKernels` to run;
    * ``module_weight`` ``[E, N - 1, d, d]`` and ``module_bias`` ``[E, N - 1, d]``: modules
      ``2..N`` stacked (module ``g + 2`` of member ``e`` at ``[e, g]``).

    Returns the output mixture ``[E, B, d]`` and, for the backward only, the module outputs
    ``y`` ``[N * S, d]`` and ReLU masks ``W_g x_g + b_g > 0`` ``[N - 1, E, B, d]`` bool.
    """

    @staticmethod
    def forward(first, index, weight, endorsed, kernels, module_weight, module_bias):  # type: ignore[override]
        members, batch, width = first.shape
        num_modules = index.shape[0]
        native = kernels.native_for(first)
        if native is not None:
            mixed, table, active = native.forward(
                first, index.contiguous(), weight.contiguous(), module_weight, module_bias, NATIVE_BLOCK
            )
            return mixed, table.view(-1, width), active
        rows, slot_weight = flat_rows(index), weight.flatten(1, 2)
        outputs = torch.empty((num_modules, members, batch, width), dtype=first.dtype, device=first.device)
        active = torch.empty(outputs[1:].shape, dtype=torch.bool, device=first.device)
        outputs[0] = first
        table = outputs.view(-1, width)
        for g in range(num_modules - 1):
            x = read_sources(table, rows[g], slot_weight[g]).view(members, batch, width)
            y = outputs[g + 1]
            torch.baddbmm(module_bias[:, g].unsqueeze(1), x, module_weight[:, g].transpose(1, 2), out=y)
            torch.gt(y, 0, out=active[g])
            y.relu_().add_(x)
        mixed = read_sources(table, rows[-1], slot_weight[-1]).view(members, batch, width)
        return mixed, table, active

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, index, weight, endorsed, kernels, module_weight, _ = inputs
        _, table, active = output
        ctx.kernels = kernels
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
        samples, width = members * batch, table.shape[-1]
        kernels = ctx.kernels
        native = kernels.native_for(table)
        if native is not None:
            grad_first, grad_weight, grad_module_weight, grad_module_bias = native.backward(
                grad_mixed, index.contiguous(), weight.contiguous(),
                endorsed.contiguous() if ctx.res_routing else None,
                table.view(num_modules, members, batch, width), active, module_weight,
                any(ctx.needs_input_grad[5:7]), NATIVE_BLOCK,
            )
            return grad_first, None, grad_weight, None, None, grad_module_weight, grad_module_bias
        rows, slot_weight = flat_rows(index), weight.flatten(1, 2)  # [N, S, k]
        # d loss / d x_j (the shortcut part of y_j) and d loss / d a_j (the module's own
        # part), rows as in ``table``; without ResRouting the shortcut buffer holds both
        grad_shortcut = torch.zeros_like(table)
        grad_own = torch.zeros_like(table) if ctx.res_routing else None
        endorsed_weight = slot_weight * endorsed.flatten(1, 2) if ctx.res_routing else [None] * num_modules
        grad_weight = [  # per gate [S, k], last gate first
            kernels.send_back(
                table, rows[-1], slot_weight[-1], endorsed_weight[-1], None, grad_mixed.reshape(-1, width), grad_shortcut, grad_own
            )
        ]
        grad_matrices, grad_biases = [], []  # per module, last first
        module_rows = torch.arange(samples, device=table.device)
        need_params = any(ctx.needs_input_grad[5:7])  # False when the parameters are detached
        for g in reversed(range(num_modules - 1)):
            grad_w, grad_bias, grad_matrix = kernels.backward_gate(
                table, rows[g], slot_weight[g], endorsed_weight[g], active[g], module_weight[:, g],
                module_rows + (g + 1) * samples, grad_shortcut, grad_own, need_params,
            )
            grad_weight.append(grad_w)
            grad_matrices.append(grad_matrix)
            grad_biases.append(grad_bias)
        grad_first = (grad_shortcut if grad_own is None else grad_own)[:samples]
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
    def vmap(info, in_dims, first, index, weight, endorsed, kernels, module_weight, module_bias):
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
            kernels,
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
    kernels: ChainKernels = EAGER_KERNELS,
) -> torch.Tensor:
    """:class:`ModuleChain`'s output mixture ``[E, B, d]`` (shapes as documented there)."""
    return ModuleChain.apply(first, index, weight, endorsed, kernels, module_weight, module_bias)[0]


def _stack_modules(per_module: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-module gradients ``[E, ...]`` -> ``[E, N - 1, ...]`` (shaped as ``like`` when ``N = 1``)."""
    return torch.stack(per_module, dim=1) if per_module else torch.zeros_like(like)
