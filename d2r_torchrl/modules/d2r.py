"""The Dynamic Depth Routing network (METHOD.md section 2)."""
from __future__ import annotations

import torch
from torch import nn

from d2r_torchrl.modules.init import hidden_linear, init_hidden, mlp, output_linear
from d2r_torchrl.modules.routing import (
    GateLayout,
    RoutingMode,
    endorsement_mask,
    route_weights,
    routing_mode,
    select_routes,
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
        selected = select_routes(
            logits,
            self.layout,
            routing_mode(),
            temperature=self.route_temperature[task_id],
            behaviour=behaviour_route,
        )
        weights = route_weights(logits, selected)
        res_routing = self.res_routing and self.training and torch.is_grad_enabled()
        endorsed = endorsement_mask(logits, self.layout) if res_routing else None
        mixed = self._run_modules(torch.relu(state), weights, selected, endorsed)
        return self.head(mixed), flat_logits, self.layout.flatten(selected)

    def _run_modules(
        self,
        inputs: torch.Tensor,
        weights: torch.Tensor,
        selected: torch.Tensor,
        endorsed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Chain the modules; returns the output-gate mixture ``[*B, width]``.

        Each gate reads its selected sources (``min(k, candidates)`` of them, as
        :func:`select_routes` returns): their indices, mixing weights and endorsement
        are gathered into ``[*B, N, k]`` tensors and the chain runs in
        :class:`_ModuleChain`. Padding slots of gates with fewer than ``k`` candidates
        get weight 0.
        """
        index = selected.to(weights.dtype).topk(self.top_k, dim=-1).indices
        slot_weights = weights.gather(-1, index)
        if endorsed is None:
            slot_endorsed = torch.ones_like(slot_weights)
        else:
            slot_endorsed = endorsed.gather(-1, index).to(weights.dtype)
        last_source = self.layout.num_candidates[:, None] - 1
        index = torch.minimum(index, last_source)  # padding slots read a computed module
        first = torch.relu(self.blocks[0](inputs))
        batch_shape, width = first.shape[:-1], first.shape[-1]
        flat = (-1, self.num_modules, self.top_k)
        mixed = _ModuleChain.apply(
            first.reshape(-1, width),
            index.reshape(flat),
            slot_weights.reshape(flat),
            slot_endorsed.reshape(flat),
            *[p for block in self.blocks[1:] for p in (block.weight, block.bias)],
        )[0]
        return mixed.reshape(*batch_shape, width)


class _ModuleChain(torch.autograd.Function):
    """Modules ``2..N`` and the output gate, with a hand-written backward.

    Plain autograd would need, at every gate, one tensor holding all earlier module
    outputs to pick each sample's sources from (``O(N^2)`` copies per pass, forward and
    backward). Here the outputs live in one module-major ``[N, B, d]`` buffer that each
    gate reads with ``index_select``; the backward walks the chain in reverse and sends
    gradients back with ``index_add_``. Inputs (``B`` samples, ``k`` slots per gate):

    * ``first`` ``[B, d]``: ``y^1``;
    * ``index`` ``[B, N, k]``: each gate's sources; ``weight`` ``[B, N, k]``: their mixing
      weights; ``endorsed`` ``[B, N, k]``: 1 where ResRouting endorses the source (all 1
      without ResRouting);
    * then weight and bias of modules ``2..N``.

    With ``x`` the plain mixture and ``x~`` the ResRouting one (equal in value), a gate's
    read of source ``j`` passes the gradient of ``x`` to all of ``y^j`` and that of ``x~``
    to ``y^j`` when endorsed, else only to the shortcut ``x^j`` of ``y^j = a^j + x^j``
    (for ``j = 1``, ``y^1 = a^1``). Returns the output mixture ``[B, d]`` and, for the
    backward only, the module outputs ``y``, inputs ``x`` and activations ``a``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(first, index, weight, endorsed, *params):  # type: ignore[override]
        num_modules = index.shape[-2]
        rows = _flat_rows(index)
        outputs = first.new_empty((num_modules, *first.shape))
        inputs = first.new_empty((num_modules - 1, *first.shape))
        activations = torch.empty_like(inputs)
        outputs[0] = first
        for gate in range(num_modules - 1):
            x = _read(outputs, rows[:, gate], weight[:, gate])
            pre_activation = torch.nn.functional.linear(x, params[2 * gate], params[2 * gate + 1])
            activation = torch.relu(pre_activation)
            inputs[gate] = x
            activations[gate] = activation
            outputs[gate + 1] = activation + x
        return _read(outputs, rows[:, -1], weight[:, -1]), outputs, inputs, activations

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, index, weight, endorsed, *params = inputs
        _, outputs, module_inputs, activations = output
        ctx.mark_non_differentiable(outputs, module_inputs, activations)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(index, weight, endorsed, outputs, module_inputs, activations, *params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mixed, *_):  # type: ignore[override]
        index, weight, endorsed, outputs, inputs, activations, *params = ctx.saved_tensors
        num_modules, slots = index.shape[-2:]
        rows = _flat_rows(index)
        flat_outputs = outputs.flatten(0, 1)
        grad_own = torch.zeros_like(outputs)  # d loss / d a^j (the module's own part)
        grad_shortcut = torch.zeros_like(outputs)  # d loss / d x^j
        grad_weight: list[torch.Tensor] = []
        grad_params: list[torch.Tensor] = []

        def send(gate: int, grad_x: torch.Tensor, grad_x_tilde: torch.Tensor) -> None:
            """Gate ``gate``'s gradients back to its sources and its mixing weights."""
            both = grad_x + grad_x_tilde
            grads = []
            for slot in range(slots):
                row = rows[:, gate, slot]
                w = weight[:, gate, slot : slot + 1]
                own = torch.addcmul(grad_x, endorsed[:, gate, slot : slot + 1], grad_x_tilde)
                grads.append((flat_outputs.index_select(0, row) * both).sum(-1))
                grad_shortcut.flatten(0, 1).index_add_(0, row, both * w)
                grad_own.flatten(0, 1).index_add_(0, row, own * w)
            grad_weight.append(torch.stack(grads, -1))

        send(num_modules - 1, torch.zeros_like(grad_mixed), grad_mixed)
        for gate in reversed(range(num_modules - 1)):
            grad_pre = torch.ops.aten.threshold_backward(grad_own[gate + 1], activations[gate], 0)
            if ctx.needs_input_grad[4]:  # skipped when the parameters are detached
                grad_params += [grad_pre.sum(0), grad_pre.t() @ inputs[gate]]  # bias, weight
            else:
                grad_params += [None, None]
            send(gate, grad_shortcut[gate + 1], grad_pre @ params[2 * gate])
        return (
            grad_own[0],
            None,
            torch.stack(grad_weight[::-1], -2),
            None,
            *grad_params[::-1],
        )


def _flat_rows(index: torch.Tensor) -> torch.Tensor:
    """Sample ``b``'s source ``j`` -> row ``j * B + b`` of a flattened ``[N * B, d]`` buffer."""
    batch = index.shape[0]
    return index * batch + torch.arange(batch, device=index.device)[:, None, None]


def _read(outputs: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_r weight[:, r] * source_r`` for the sources at ``rows`` ``[B, k]`` of ``outputs``."""
    sources = outputs.flatten(0, 1).index_select(0, rows.flatten()).unflatten(0, rows.shape)
    mixed = sources[:, 0] * weight[:, :1]
    for slot in range(1, rows.shape[-1]):  # k is small: one fused multiply-add per slot
        mixed = torch.addcmul(mixed, sources[:, slot], weight[:, slot : slot + 1])
    return mixed


def route_temperature_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    """``T * softmax(-log_alpha)``: also the loss-balancing weights of METHOD.md section 3."""
    log_alpha = log_alpha.detach()
    return log_alpha.numel() * torch.softmax(-log_alpha, dim=-1)
