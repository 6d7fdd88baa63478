"""Baseline networks of METHOD.md section 4: MT-SAC and MH-SAC MLPs, Soft Modularization.

Every network maps ``(features [*B, in], task_id [*B] or [*B, 1])`` to ``[*B, out]``.
"""
from __future__ import annotations

import torch
from torch import nn

from d2r_torchrl import argument_checks as check
from d2r_torchrl.modules.init import hidden_linear, init_hidden, layer_norm_or_identity, mlp, output_linear, reset_linear_layers
from d2r_torchrl.modules.task_conditioning import TaskEmbedding, check_features, flatten_task_id


class MultiTaskMLP(nn.Module):
    """MT-SAC: an MLP on ``features ⊕ one_hot(task_id)`` (default widths 400-400-400).

    With ``multi_head=True`` (MH-SAC) the output layer has one head per task and each
    sample reads its own task's head. ``layer_norm`` puts a ``LayerNorm`` after every
    hidden ``Linear`` (before its ReLU).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        out_features: int,
        *,
        hidden_widths: tuple[int, ...] = (400, 400, 400),
        multi_head: bool = False,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(in_features, num_tasks, out_features)
        hidden_widths = check.widths("hidden_widths", hidden_widths)
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.out_features = out_features
        self.multi_head = multi_head
        self.trunk = mlp(in_features + num_tasks, tuple(hidden_widths), final_activation=True, layer_norm=layer_norm)
        heads = num_tasks if multi_head else 1
        self.head = output_linear(hidden_widths[-1], heads * out_features)

    def reset_parameters(self) -> None:
        """Re-draw every parameter with the project's initialisation (the head as an output layer)."""
        reset_linear_layers(self, output_layers=[self.head])

    def forward(self, features: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        check_features(features, self.in_features, "the input")
        task_id = flatten_task_id(task_id, features.shape[:-1])
        one_hot = torch.nn.functional.one_hot(task_id, self.num_tasks).to(features.dtype)
        out = self.head(self.trunk(torch.cat([features, one_hot], dim=-1)))
        if not self.multi_head:
            return out
        out = out.unflatten(-1, (self.num_tasks, self.out_features))
        index = task_id[..., None, None].expand(*task_id.shape, 1, self.out_features)
        return out.gather(-2, index).squeeze(-2)


class SoftModularNetwork(nn.Module):
    """Soft Modularization (reference-code variant), ``L`` layers of ``n`` modules.

    State encoder ``f`` (no final activation), task embedding ``h = Linear(T, width)``,
    gating features ``g = MLP(ReLU(f * h))`` (no final activation). Layer-0 routing is
    ``softmax(W_0 ReLU(g))`` reshaped ``[n, n]`` (row = destination, column = source,
    softmax over sources); layer ``l >= 1`` conditions on all earlier probability
    matrices: ``softmax(W_l ReLU(C_l [p_0..p_{l-1}] * g))``. Modules of layer ``l + 1``
    read ``ReLU(sum_s p_l[dst, s] y_s)``; the last layer is mixed by
    ``softmax(W_last ReLU(C_last [p_0..p_{L-2}] * g))``, then ReLU and the output layer.

    ``layer_norm`` puts a ``LayerNorm`` after every ``Linear`` of the state encoder and of
    every module (before the ReLU that follows); the gating network and routing are unchanged.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        out_features: int,
        *,
        num_layers: int = 2,
        num_modules: int = 2,
        module_width: int = 256,
        encoder_widths: tuple[int, ...] = (400, 400),
        gating_widths: tuple[int, ...] = (256, 256),
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 2 or num_modules < 1:
            raise ValueError(
                f"Soft Modularization needs num_layers >= 2 and num_modules >= 1, "
                f"got {num_layers} and {num_modules}."
            )
        _check_sizes(in_features, num_tasks, out_features)
        check.positive_int("module_width", module_width)
        encoder_widths = check.widths("encoder_widths", encoder_widths)
        gating_widths = check.widths("gating_widths", gating_widths)
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.num_layers = num_layers
        self.num_modules = num_modules
        embed_width = encoder_widths[-1]
        gate_width = gating_widths[-1]
        square = num_modules * num_modules
        self.state_encoder = mlp(in_features, tuple(encoder_widths), final_activation=False, layer_norm=layer_norm)
        self.task_embedding = TaskEmbedding(num_tasks, embed_width)
        init_hidden(self.task_embedding)
        self.gating = mlp(embed_width, tuple(gating_widths), final_activation=False)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                hidden_linear(embed_width if layer == 0 else module_width, module_width)
                for _ in range(num_modules)
            )
            for layer in range(num_layers)
        )
        self.module_norms = nn.ModuleList(
            nn.ModuleList(layer_norm_or_identity(module_width, layer_norm) for _ in range(num_modules))
            for _ in range(num_layers)
        )
        self.route_logits = nn.ModuleList(
            output_linear(gate_width, square) for _ in range(num_layers - 1)
        )
        self.route_conditions = nn.ModuleList(
            hidden_linear(layer * square, gate_width) for layer in range(1, num_layers - 1)
        )
        self.last_condition = hidden_linear((num_layers - 1) * square, gate_width)
        self.last_logits = output_linear(gate_width, num_modules)
        self.head = output_linear(module_width, out_features)

    def reset_parameters(self) -> None:
        """Re-draw every parameter with the project's initialisation (routing logits, final
        mix and head as output layers)."""
        reset_linear_layers(self, output_layers=[*self.route_logits, self.last_logits, self.head])

    def routing_probabilities(
        self, gating: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-layer ``[*B, n, n]`` routing matrices and the final ``[*B, n]`` mix."""
        n = self.num_modules
        probs = [torch.softmax(self.route_logits[0](torch.relu(gating)).unflatten(-1, (n, n)), -1)]
        for condition, logits in zip(self.route_conditions, self.route_logits[1:]):
            history = torch.cat([p.flatten(-2) for p in probs], dim=-1)
            cond = torch.relu(condition(history) * gating)
            probs.append(torch.softmax(logits(cond).unflatten(-1, (n, n)), -1))
        history = torch.cat([p.flatten(-2) for p in probs], dim=-1)
        last = torch.softmax(self.last_logits(torch.relu(self.last_condition(history) * gating)), -1)
        return probs, last

    def forward(self, features: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        check_features(features, self.in_features, "the input")
        task_id = flatten_task_id(task_id, features.shape[:-1])
        state = self.state_encoder(features)
        gating = self.gating(torch.relu(self.task_embedding(task_id) * state))
        probs, last = self.routing_probabilities(gating)
        inputs = torch.relu(state)
        outputs = torch.stack([norm(module(inputs)) for module, norm in zip(self.layers[0], self.module_norms[0])], -2)
        for p, layer, norms in zip(probs, self.layers[1:], self.module_norms[1:]):
            mixed = torch.relu(p @ outputs)
            outputs = torch.stack([norm(module(mixed[..., i, :])) for i, (module, norm) in enumerate(zip(layer, norms))], -2)
        mixed = torch.relu((last.unsqueeze(-2) @ outputs).squeeze(-2))
        return self.head(mixed)


SOFT_MODULAR_PRESETS = {
    "shallow": dict(num_layers=2, num_modules=2, module_width=256),
    "deep": dict(num_layers=4, num_modules=4, module_width=128),
}


def _check_sizes(in_features: int, num_tasks: int, out_features: int) -> None:
    for name, value in (("in_features", in_features), ("num_tasks", num_tasks), ("out_features", out_features)):
        check.positive_int(name, value)
