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
        mixed = self._run_modules(torch.relu(state), weights, endorsed)
        return self.head(mixed), flat_logits, self.layout.flatten(selected)

    def _run_modules(
        self, inputs: torch.Tensor, weights: torch.Tensor, endorsed: torch.Tensor | None
    ) -> torch.Tensor:
        """Chain the modules; returns the output-gate mixture ``[*B, width]``.

        ``outputs`` holds ``y^j``; with ResRouting, ``stopped`` holds ``ybar^j``, the
        same values with the module's own contribution detached.
        """
        first = torch.relu(self.blocks[0](inputs))
        outputs = [first]
        stopped = [first.detach()] if endorsed is not None else None
        for gate, block in enumerate(self.blocks[1:]):
            shortcut, block_input = _mix(gate, outputs, stopped, weights, endorsed)
            activation = torch.relu(block(block_input))
            outputs.append(activation + shortcut)
            if stopped is not None:
                stopped.append(activation.detach() + shortcut)
        _, head_input = _mix(self.num_modules - 1, outputs, stopped, weights, endorsed)
        return head_input


def _mix(
    gate: int,
    outputs: list[torch.Tensor],
    stopped: list[torch.Tensor] | None,
    weights: torch.Tensor,
    endorsed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate ``gate``'s mixture of the modules so far.

    Returns ``(x, x_tilde)``: ``x = sum_j w_j y^j`` and, under ResRouting,
    ``x_tilde = sum_j w_j [m_j y^j + (1 - m_j) ybar^j]`` (equal to ``x`` in value).
    """
    count = len(outputs)
    w = weights[..., gate, :count]
    sources = torch.stack(outputs, dim=-2)
    mixed = torch.einsum("...j,...jd->...d", w, sources)
    if endorsed is None:
        return mixed, mixed
    m = endorsed[..., gate, :count]
    kept = torch.einsum("...j,...jd->...d", w * m, sources)
    cut = torch.einsum("...j,...jd->...d", w * ~m, torch.stack(stopped, dim=-2))
    return mixed, kept + cut


def route_temperature_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    """``T * softmax(-log_alpha)``: also the loss-balancing weights of METHOD.md section 3."""
    log_alpha = log_alpha.detach()
    return log_alpha.numel() * torch.softmax(-log_alpha, dim=-1)
