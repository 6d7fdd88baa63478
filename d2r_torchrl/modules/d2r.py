"""The Dynamic Depth Routing network (METHOD.md section 2)."""
from __future__ import annotations

import torch
from torch import nn

from d2r_torchrl.modules.init import hidden_linear, init_hidden, mlp, output_linear
from d2r_torchrl.modules.routing import (
    GateLayout,
    RoutingMode,
    route_mask,
    routing_mode,
    select_sources,
    slot_endorsement,
    slot_weights,
)
from d2r_torchrl.modules.task_conditioning import TaskEmbedding, check_features, flatten_task_id


class D2RNetwork(nn.Module):
    """Encoders, router and a chain of ``N`` modules whose sources are routed per sample.

    Args:
        in_features: input width (state, or state and action for a critic).
        num_tasks: number of tasks ``T``.
        out_features: output width.
        num_modules: ``N``; module 1 maps the encoder output to ``module_width``.
        module_width: width of every module.
        top_k: sources per gate ``k``.
        encoder_widths: state-encoder widths (last one is the routing-input width).
        router_widths: hidden widths of the router MLP.
        res_routing: apply ResRouting when the module is in training mode and
            gradients are recorded (forward values are unchanged either way).

    ``forward(features [*B, in], task_id [*B] or [*B, 1], behaviour_route [*B, L] bool)``
    returns ``(out [*B, out], logits [*B, L], route [*B, L] bool)`` with
    ``L = N(N+1)/2``. The route follows :func:`routing_mode`.

    Buffer ``route_temperature`` ``[T]`` holds the per-task routing temperature
    (automatic route balancing); set it with :meth:`set_route_temperature`.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        out_features: int,
        *,
        num_modules: int = 16,
        module_width: int = 128,
        top_k: int = 2,
        encoder_widths: tuple[int, ...] = (400, 400),
        router_widths: tuple[int, ...] = (256, 256),
        res_routing: bool = True,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.res_routing = res_routing
        self.layout = GateLayout(num_modules, top_k)
        embed_width = encoder_widths[-1]
        self.state_encoder = mlp(in_features, tuple(encoder_widths), final_activation=False)
        self.task_embedding = TaskEmbedding(num_tasks, embed_width)
        init_hidden(self.task_embedding)
        self.router = nn.Sequential(
            mlp(embed_width, tuple(router_widths), final_activation=True),
            hidden_linear(router_widths[-1], self.layout.num_logits),
        )
        self.blocks = nn.ModuleList(
            [hidden_linear(embed_width, module_width)]
            + [hidden_linear(module_width, module_width) for _ in range(num_modules - 1)]
        )
        self.head = output_linear(module_width, out_features)
        self.register_buffer("route_temperature", torch.ones(num_tasks))

    @property
    def num_modules(self) -> int:
        return self.layout.num_modules

    @property
    def top_k(self) -> int:
        return self.layout.top_k

    @torch.no_grad()
    def set_route_temperature(self, log_alpha: torch.Tensor) -> None:
        """Automatic route balancing: ``tau = T * softmax(-log_alpha)``."""
        self.route_temperature.copy_(route_temperature_from_log_alpha(log_alpha))

    def forward(
        self,
        features: torch.Tensor,
        task_id: torch.Tensor,
        behaviour_route: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_features(features, self.in_features, "the input")
        task_id = flatten_task_id(task_id, features.shape[:-1])
        state = self.state_encoder(features)
        routing_input = self.task_embedding(task_id) * state
        flat_logits = self.router(routing_input)
        logits = self.layout.pad(flat_logits)
        index = select_sources(
            logits,
            self.layout,
            routing_mode(),
            temperature=self.route_temperature[task_id],
            behaviour=behaviour_route,
        )
        weights = slot_weights(logits, index, self.layout)
        res_routing = self.res_routing and self.training and torch.is_grad_enabled()
        endorsed = slot_endorsement(logits, index, self.layout) if res_routing else None
        mixed = self._run_modules(torch.relu(state), index, weights, endorsed)
        return self.head(mixed), flat_logits, self.layout.flatten(route_mask(index, self.layout))

    def _run_modules(
        self,
        inputs: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        endorsed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Chain the modules; returns the output-gate mixture ``[*B, width]``.

        ``index``, ``weights`` and ``endorsed`` are ``[*B, N, k]`` (see
        :func:`select_sources`); padding slots are pointed at a computed module and get
        weight 0. The chain runs in :class:`_ModuleChain` as an ensemble of one.
        """
        index = torch.minimum(index, self.layout.last_source)
        first = torch.relu(self.blocks[0](inputs))
        batch_shape, width = first.shape[:-1], first.shape[-1]
        gate_major = (-1, self.num_modules, self.top_k)

        def chain_layout(slots: torch.Tensor) -> torch.Tensor:
            """``[*B, N, k]`` -> ``[N, 1, B, k]`` (gate-major, ensemble of one)."""
            return slots.reshape(gate_major).transpose(0, 1).unsqueeze(1)

        mixed = _ModuleChain.apply(
            first.reshape(1, -1, width),
            chain_layout(index),
            chain_layout(weights),
            None if endorsed is None else chain_layout(endorsed.to(weights.dtype)),
            *[p.unsqueeze(0) for block in self.blocks[1:] for p in (block.weight, block.bias)],
        )[0]
        return mixed.reshape(*batch_shape, width)


class _ModuleChain(torch.autograd.Function):
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
    in one module-major buffer ``[N, E * B, d]`` that each gate reads with one
    ``embedding_bag`` (gather and weighted sum fused). The backward keeps only that buffer
    and the ReLU masks, recomputes each module's input ``x``, walks the chain in reverse and
    sends gradients back with one ``index_add_`` per gate. The members' linear maps are
    batched matrix products, so twin critics run as one chain; under :func:`torch.vmap` the
    vmapped dimension is folded into the ensemble (see :meth:`vmap`).

    Inputs (``S = E * B`` samples, ``k`` slots per gate):

    * ``first`` ``[E, B, d]``: ``y_1``;
    * ``index`` ``[N, E, B, k]`` long: each gate's sources (``<=`` the gate's last
      candidate); ``weight`` ``[N, E, B, k]``: their mixing weights; ``endorsed``
      ``[N, E, B, k]`` or ``None``: 1 where ResRouting endorses the source (``None``
      without ResRouting);
    * then weight ``[E, d, d]`` and bias ``[E, d]`` of modules ``2..N``.

    Returns the output mixture ``[E, B, d]`` and, for the backward only, the module outputs
    ``y`` ``[N, S, d]`` and ReLU masks ``W_g x_g + b_g > 0`` ``[N - 1, S, d]`` bool.
    """

    @staticmethod
    def forward(first, index, weight, endorsed, *params):  # type: ignore[override]
        members, batch, width = first.shape
        num_modules = index.shape[0]
        rows, slot_weight = _flat_rows(index), weight.flatten(1, 2)
        outputs = torch.empty((num_modules, members * batch, width), dtype=first.dtype, device=first.device)
        active = torch.empty(outputs[1:].shape, dtype=torch.bool, device=first.device)
        outputs[0] = first.reshape(-1, width)
        table = outputs.flatten(0, 1)
        for gate in range(num_modules - 1):
            x = _read(table, rows[gate], slot_weight[gate]).view(members, batch, width)
            y = outputs[gate + 1].view(members, batch, width)
            torch.baddbmm(params[2 * gate + 1].unsqueeze(1), x, params[2 * gate].transpose(1, 2), out=y)
            torch.gt(y, 0, out=active[gate].view(members, batch, width))
            y.relu_().add_(x)
        mixed = _read(table, rows[-1], slot_weight[-1]).view(members, batch, width)
        return mixed, outputs, active

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, index, weight, endorsed, *params = inputs
        _, outputs, active = output
        ctx.mark_non_differentiable(outputs, active)
        ctx.set_materialize_grads(False)
        ctx.res_routing = endorsed is not None
        saved_endorsed = endorsed if endorsed is not None else torch.empty(0, dtype=weight.dtype, device=weight.device)
        ctx.save_for_backward(index, weight, saved_endorsed, outputs, active, *params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mixed, *_):  # type: ignore[override]
        index, weight, endorsed, outputs, active, *params = ctx.saved_tensors
        num_modules, members, batch, slots = index.shape
        width = outputs.shape[-1]
        rows, slot_weight = _flat_rows(index), weight.flatten(1, 2)  # [N, S, k]
        table = outputs.flatten(0, 1)
        # d loss / d x_j (the shortcut part) and d loss / d a_j (the module's own part); the
        # same buffer without ResRouting
        grad_shortcut = torch.zeros_like(outputs)
        grad_own = torch.zeros_like(outputs) if ctx.res_routing else grad_shortcut
        endorsed_weight = slot_weight * endorsed.flatten(1, 2) if ctx.res_routing else slot_weight
        grad_weight: list[torch.Tensor] = []  # per gate [S, k], last gate first
        grad_params: list[torch.Tensor | None] = []

        def send(gate: int, grad_x: torch.Tensor | None, grad_x_tilde: torch.Tensor) -> None:
            """Gate ``gate``'s gradients ``[S, d]`` back to its sources and mixing weights."""
            row = rows[gate].flatten()
            both = grad_x_tilde if grad_x is None else grad_x + grad_x_tilde
            sources = table.index_select(0, row).view(-1, slots, width)
            grad_weight.append((sources * both.unsqueeze(1)).sum(-1))
            grad_shortcut.flatten(0, 1).index_add_(0, row, (slot_weight[gate, ..., None] * both.unsqueeze(1)).flatten(0, 1))
            if ctx.res_routing:
                own = endorsed_weight[gate, ..., None] * grad_x_tilde.unsqueeze(1)
                if grad_x is not None:
                    own = torch.addcmul(own, slot_weight[gate, ..., None], grad_x.unsqueeze(1))
                grad_own.flatten(0, 1).index_add_(0, row, own.flatten(0, 1))

        send(num_modules - 1, None, grad_mixed.reshape(-1, width))
        for gate in reversed(range(num_modules - 1)):
            x = _read(table, rows[gate], slot_weight[gate])  # recomputed: cheaper than kept
            grad_pre = (grad_own[gate + 1] * active[gate]).view(members, batch, width)
            if ctx.needs_input_grad[4]:  # skipped when the parameters are detached
                module_input = x.view(members, batch, width)
                grad_params += [grad_pre.sum(1), torch.bmm(grad_pre.transpose(1, 2), module_input)]
            else:
                grad_params += [None, None]
            grad_x_tilde = torch.bmm(grad_pre, params[2 * gate]).view(-1, width)
            send(gate, grad_shortcut[gate + 1], grad_x_tilde)
        return (
            grad_own[0].view(members, batch, width),
            None,
            torch.stack(grad_weight[::-1]).view(num_modules, members, batch, slots),
            None,
            *grad_params[::-1],
        )

    @staticmethod
    def vmap(info, in_dims, first, index, weight, endorsed, *params):
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

        mixed, outputs, active = _ModuleChain.apply(
            fold(first, in_dims[0], 0),
            fold(index, in_dims[1], 1),
            fold(weight, in_dims[2], 1),
            fold(endorsed, in_dims[3], 1),
            *[fold(p, d, 0) for p, d in zip(params, in_dims[4:])],
        )

        # the buffers' sample dimension is (V * E * B): split V back out of it
        unfolded = (mixed.unflatten(0, (size, -1)), outputs.unflatten(1, (size, -1)), active.unflatten(1, (size, -1)))
        return unfolded, (0, 1, 1)


def _flat_rows(index: torch.Tensor) -> torch.Tensor:
    """``[N, E, B, k]`` sources -> rows ``[N, E * B, k]`` of the flattened ``[N * E * B, d]``
    buffer: member ``e``'s sample ``b`` reading source ``j`` is row ``j * E * B + e * B + b``."""
    samples = index.shape[1] * index.shape[2]
    sample = torch.arange(samples, device=index.device).view(1, samples, 1)
    return index.flatten(1, 2) * samples + sample


def _read(table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_r weight[:, r] * table[rows[:, r]]`` for ``rows``/``weight`` ``[S, k]``: ``[S, d]``."""
    return torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weight, mode="sum")


def route_temperature_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    """``T * softmax(-log_alpha)``: also the loss-balancing weights of METHOD.md section 3."""
    log_alpha = log_alpha.detach()
    return log_alpha.numel() * torch.softmax(-log_alpha, dim=-1)
