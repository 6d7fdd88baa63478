"""Critic output heads other than a single value."""
from __future__ import annotations

import torch
from torch import nn


class HLGaussValue(nn.Module):
    """A categorical value head (HL-Gauss): the critic outputs logits over ``num_bins`` equal
    bins of ``[v_min, v_max]``; its value is the mean of their softmax over the bin centres,
    and it learns by cross-entropy against the target ``y`` smoothed into a Gaussian of
    standard deviation ``sigma_ratio`` bin widths, integrated over each bin::

        p_j(y) = [Phi((e_{j+1} - y) / sigma) - Phi((e_j - y) / sigma)] / [Phi((e_K - y) / sigma) - Phi((e_0 - y) / sigma)]

    with ``e_0 = v_min < e_1 < ... < e_K = v_max`` the bin edges and ``Phi`` the standard normal
    CDF (``y`` is first clamped to ``[v_min, v_max]``). Buffers ``centers`` ``[K]``, ``edges``
    ``[K + 1]``.
    """

    def __init__(self, v_min: float, v_max: float, num_bins: int, sigma_ratio: float = 0.75) -> None:
        super().__init__()
        if not v_max > v_min or num_bins < 2 or sigma_ratio <= 0:
            raise ValueError(
                f"HLGaussValue needs v_max > v_min, num_bins >= 2 and sigma_ratio > 0; "
                f"got v_min={v_min}, v_max={v_max}, num_bins={num_bins}, sigma_ratio={sigma_ratio}."
            )
        edges = torch.linspace(v_min, v_max, num_bins + 1)
        self.register_buffer("edges", edges)
        self.register_buffer("centers", (edges[1:] + edges[:-1]) / 2)
        self.sigma = sigma_ratio * (v_max - v_min) / num_bins

    @property
    def num_bins(self) -> int:
        return self.centers.shape[0]

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """``[*B, K]`` logits -> ``[*B, 1]`` values."""
        return (torch.softmax(logits, -1) * self.centers.to(logits.dtype)).sum(-1, keepdim=True)

    def target_probs(self, target: torch.Tensor) -> torch.Tensor:
        """``[*B]`` targets -> ``[*B, K]`` bin probabilities (rows sum to 1)."""
        edges = self.edges.to(target.dtype)
        target = target.clamp(edges[0], edges[-1]).unsqueeze(-1)
        cdf = torch.special.ndtr((edges - target) / self.sigma)
        return (cdf[..., 1:] - cdf[..., :-1]) / (cdf[..., -1:] - cdf[..., :1])

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-sum_j p_j(y) log softmax(logits)_j``: ``[*B, K]`` logits and ``[*B]`` targets -> ``[*B]``."""
        return -(self.target_probs(target.detach()) * torch.log_softmax(logits, -1)).sum(-1)
