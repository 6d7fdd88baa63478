"""Weight initialisation shared by every network of the project (reference-code scheme)."""
from __future__ import annotations

import math

import torch
from torch import nn

HIDDEN_BIAS = 0.1
OUTPUT_BOUND = 3e-3


def init_hidden(layer: nn.Linear) -> nn.Linear:
    """Weights uniform in ``+-1/sqrt(out_features)``, bias ``0.1``.

    The reference computes its "fan-in" from the first weight dimension, which for
    ``nn.Linear`` is ``out_features``; we keep that so that results are comparable.
    """
    bound = 1.0 / math.sqrt(layer.out_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        layer.bias.fill_(HIDDEN_BIAS)
    return layer


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
