"""Weight initialisation shared by every network of the project (reference-code scheme)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

HIDDEN_BIAS = 0.1
OUTPUT_BOUND = 3e-3


def init_hidden(layer: nn.Linear) -> nn.Linear:
    """Weights uniform in ``+-1/sqrt(out_features)``, bias ``0.1``.

    The reference computes its "fan-in" from the first weight dimension, which for
    ``nn.Linear`` is ``out_features``; we keep that so that results are comparable.
    """
    init_hidden_tensors(layer.weight, layer.bias, layer.out_features)
    return layer


@torch.no_grad()
def init_hidden_tensors(weight: torch.Tensor, bias: torch.Tensor, out_features: int) -> None:
    """:func:`init_hidden` on raw tensors of any leading shape (stacked modules, ensembles)."""
    bound = 1.0 / math.sqrt(out_features)
    weight.uniform_(-bound, bound)
    bias.fill_(HIDDEN_BIAS)


def init_output(layer: nn.Linear) -> nn.Linear:
    """Weights and bias uniform in ``+-3e-3``."""
    with torch.no_grad():
        layer.weight.uniform_(-OUTPUT_BOUND, OUTPUT_BOUND)
        layer.bias.uniform_(-OUTPUT_BOUND, OUTPUT_BOUND)
    return layer


def hidden_linear(in_features: int, out_features: int) -> nn.Linear:
    return init_hidden(nn.Linear(in_features, out_features))


def output_linear(in_features: int, out_features: int) -> nn.Linear:
    return init_output(nn.Linear(in_features, out_features))


def layer_norm_or_identity(width: int, layer_norm: bool) -> nn.Module:
    """``LayerNorm(width)`` (unit gain, zero shift) when ``layer_norm``, else the identity
    (which adds no parameters, so state dicts keep the reference's keys)."""
    return nn.LayerNorm(width) if layer_norm else nn.Identity()


def mlp(in_features: int, widths: tuple[int, ...], final_activation: bool, layer_norm: bool = False) -> nn.Sequential:
    """Hidden-initialised ``Linear`` layers with ReLU between them (and after the last
    one when ``final_activation``); with ``layer_norm`` every ``Linear`` is followed by a
    ``LayerNorm`` (before its ReLU)."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(hidden_linear(in_features, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        if final_activation or i < len(widths) - 1:
            layers.append(nn.ReLU())
        in_features = width
    return nn.Sequential(*layers)


def reset_linear_layers(network: nn.Module, output_layers: Iterable[nn.Linear]) -> None:
    """Re-draw every ``nn.Linear`` of ``network`` as built: :func:`init_output` for
    ``output_layers``, :func:`init_hidden` for the others (the task embedding included);
    LayerNorms back to gain 1 and shift 0.
    Works in place, so also on parameters swapped in by ``TensorDict.to_module`` (a loss's
    functional or stacked copies)."""
    outputs = {id(layer) for layer in output_layers}
    for module in network.modules():
        if isinstance(module, nn.Linear):
            (init_output if id(module) in outputs else init_hidden)(module)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
