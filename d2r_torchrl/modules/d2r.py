"""The Dynamic Depth Routing network (METHOD.md section 2), on its fast paths; the
specification it computes is :mod:`~d2r_torchrl.modules.d2r_spec`."""
from __future__ import annotations

import torch
from torch import nn

from d2r_torchrl import argument_checks as check
from d2r_torchrl.modules.d2r_spec import dense_routes, module_chain
from d2r_torchrl.modules.init import (
    hidden_linear,
    init_hidden,
    init_hidden_tensors,
    layer_norm_or_identity,
    mlp,
    output_linear,
    reset_linear_layers,
)
from d2r_torchrl.modules.module_chain import run_chain
from d2r_torchrl.modules.routing import GateLayout, route_slots, routing_mode
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
        native_chain: on the CPU, run the module chain as one native pass per direction
            and pick routes with the native routing pass (:mod:`~d2r_torchrl.modules.native_chain`;
            the PyTorch path runs on CUDA, under ``torch.compile`` or if it cannot be built);
            an attribute, so it can be switched after construction.
        layer_norm: a ``LayerNorm`` after every ``Linear`` of the state encoder and of every
            module, before its ReLU (module ``i``: ``relu(LN(W^i x~^i + b^i)) + x^i``); router
            and head are unchanged. Neither the native pass nor
            :class:`~d2r_torchrl.modules.module_chain.ModuleChain` normalises, so with it the
            chain runs in the specification's plain-autograd form
            (:func:`~d2r_torchrl.modules.d2r_spec.module_chain`), whatever ``native_chain`` says.

    ``forward(features [*B, in], task_id [*B] or [*B, 1], behaviour_route [*B, L] bool)``
    returns ``(out [*B, out], logits [*B, L], route [*B, L] bool)`` with
    ``L = N(N+1)/2``. The route follows :func:`routing_mode`. Along that route ``out`` is
    :func:`~d2r_torchrl.modules.d2r_spec.network_forward`, values and gradients
    (``test_gradients_match_a_gate_by_gate_implementation``, both chain paths).

    Module 1 is the ``Linear`` ``first_module``; modules ``2..N`` are stacked in the parameters
    ``module_weight`` ``[N - 1, d, d]`` and ``module_bias`` ``[N - 1, d]`` (one tensor each, so
    a functional call or an optimiser step handles two tensors, not ``2(N - 1)``). State dicts
    with one ``blocks.{i}`` entry per module, as saved before, load too.

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
        native_chain: bool = True,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("num_tasks", num_tasks),
            ("out_features", out_features),
            ("num_modules", num_modules),
            ("module_width", module_width),
            ("top_k", top_k),
        ):
            check.positive_int(name, value)
        encoder_widths = check.widths("encoder_widths", encoder_widths)
        router_widths = check.widths("router_widths", router_widths)
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.res_routing = res_routing
        self.native_chain = native_chain
        self.layer_norm = layer_norm
        self.layout = GateLayout(num_modules, top_k)
        embed_width = encoder_widths[-1]
        self.state_encoder = mlp(in_features, tuple(encoder_widths), final_activation=False, layer_norm=layer_norm)
        self.task_embedding = TaskEmbedding(num_tasks, embed_width)
        init_hidden(self.task_embedding)
        self.router = nn.Sequential(
            mlp(embed_width, tuple(router_widths), final_activation=True),
            hidden_linear(router_widths[-1], self.layout.num_logits),
        )
        self.first_module = hidden_linear(embed_width, module_width)
        self.first_norm = layer_norm_or_identity(module_width, layer_norm)
        later = [hidden_linear(module_width, module_width) for _ in range(num_modules - 1)]
        self.module_weight = nn.Parameter(_stack([m.weight for m in later], (module_width, module_width)))
        self.module_bias = nn.Parameter(_stack([m.bias for m in later], (module_width,)))
        if layer_norm:  # gains and shifts of modules 2..N, stacked as their weights
            self.module_norm_weight = nn.Parameter(torch.ones(num_modules - 1, module_width))
            self.module_norm_bias = nn.Parameter(torch.zeros(num_modules - 1, module_width))
        self.head = output_linear(module_width, out_features)
        self.register_buffer("route_temperature", torch.ones(num_tasks))
        self.register_load_state_dict_pre_hook(_stack_per_module_keys)

    @staticmethod
    def parameter_count(
        in_features: int,
        num_tasks: int,
        out_features: int,
        *,
        num_modules: int = 16,
        module_width: int = 128,
        encoder_widths: tuple[int, ...] = (400, 400),
        router_widths: tuple[int, ...] = (256, 256),
    ) -> int:
        """The number of parameters of the network these arguments build, without building it
        (``test_parameter_count_matches_the_built_network``)."""

        def layers(widths: tuple[int, ...]) -> int:  # Linear layers between consecutive widths
            return sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:]))

        embed_width = encoder_widths[-1]
        num_logits = num_modules * (num_modules + 1) // 2
        return (
            layers((in_features, *encoder_widths))
            + layers((num_tasks, embed_width))
            + layers((embed_width, *router_widths, num_logits))
            + layers((embed_width, module_width))
            + (num_modules - 1) * layers((module_width, module_width))
            + layers((module_width, out_features))
        )

    @property
    def num_modules(self) -> int:
        return self.layout.num_modules

    @property
    def top_k(self) -> int:
        return self.layout.top_k

    def reset_parameters(self) -> None:
        """Re-draw every parameter with the project's initialisation (:mod:`~d2r_torchrl.modules.init`):
        hidden layers, task embedding and modules ``2..N`` as hidden layers, the head as an
        output layer, LayerNorms (``layer_norm``) at gain 1 and shift 0. The routing
        temperatures (buffers) are left as they are."""
        reset_linear_layers(self, output_layers=[self.head])
        init_hidden_tensors(self.module_weight, self.module_bias, self.module_weight.shape[-2])
        if self.layer_norm:
            with torch.no_grad():
                self.module_norm_weight.fill_(1.0)
                self.module_norm_bias.zero_()

    def module_norm(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[()]:
        """``(gain, shift)`` ``[N - 1, d]`` of the modules' LayerNorms, or ``()`` without ``layer_norm``."""
        return (self.module_norm_weight, self.module_norm_bias) if self.layer_norm else ()

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
        res_routing = self.res_routing and self.training and torch.is_grad_enabled()
        slots = route_slots(
            flat_logits,
            self.layout,
            routing_mode(),
            temperature=self.route_temperature[task_id],
            behaviour=behaviour_route,
            endorse=res_routing,
            native=self.native_chain,
        )
        if self.layer_norm:
            first = torch.relu(self.first_norm(self.first_module(torch.relu(state))))
            weights, endorsed = dense_routes(flat_logits, slots.route, self.layout, res_routing)
            mixed = module_chain(first, weights, endorsed, self.module_weight, self.module_bias, *self.module_norm())
        else:
            mixed = self._run_modules(torch.relu(state), slots.sources, slots.weights, slots.endorsed)
        return self.head(mixed), flat_logits, slots.route

    def _run_modules(
        self,
        inputs: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        endorsed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Chain the modules; returns the output-gate mixture ``[*B, width]``.

        ``index``, ``weights`` and ``endorsed`` are ``[*B, N, k]`` (see
        :class:`~d2r_torchrl.modules.routing.RouteSlots`). The chain runs in
        :class:`~d2r_torchrl.modules.module_chain.ModuleChain` as an ensemble of one.
        """
        first = torch.relu(self.first_module(inputs))
        batch_shape, width = first.shape[:-1], first.shape[-1]
        gate_major = (-1, self.num_modules, self.top_k)

        def chain_layout(slots: torch.Tensor) -> torch.Tensor:
            """``[*B, N, k]`` -> ``[N, 1, B, k]`` (gate-major, ensemble of one)."""
            return slots.reshape(gate_major).transpose(0, 1).unsqueeze(1)

        mixed = run_chain(
            first.reshape(1, -1, width),
            chain_layout(index),
            chain_layout(weights),
            None if endorsed is None else chain_layout(endorsed.to(weights.dtype)),
            self.module_weight.unsqueeze(0),
            self.module_bias.unsqueeze(0),
            self.native_chain,
        )
        return mixed.reshape(*batch_shape, width)


def route_temperature_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    """``T * softmax(-log_alpha)``: also the loss-balancing weights of METHOD.md section 3."""
    log_alpha = log_alpha.detach()
    return log_alpha.numel() * torch.softmax(-log_alpha, dim=-1)


def _stack(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """``[len(tensors), *shape]`` (also for no tensors: a network of one module)."""
    return torch.stack([t.detach() for t in tensors]) if tensors else torch.empty(0, *shape)


def _stack_per_module_keys(module: D2RNetwork, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: ``blocks.0.*`` -> ``first_module.*`` and ``blocks.{1..N-1}.*``
    stacked into ``module_weight``/``module_bias`` (the per-module layout of earlier versions)."""
    if f"{prefix}blocks.0.weight" not in state_dict:
        return
    for name in ("weight", "bias"):
        state_dict[f"{prefix}first_module.{name}"] = state_dict.pop(f"{prefix}blocks.0.{name}")
        later = [state_dict.pop(f"{prefix}blocks.{i}.{name}") for i in range(1, module.num_modules)
                 if f"{prefix}blocks.{i}.{name}" in state_dict]
        if later:
            state_dict[f"{prefix}module_{name}"] = torch.stack(later)
