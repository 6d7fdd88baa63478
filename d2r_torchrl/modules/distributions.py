"""The policy's tanh-squashed Gaussian: TorchRL's exact log-probability or the reference's.

For ``a = c + h tanh(z)``, ``z ~ N(mu, sigma)`` on the box ``[c - h, c + h]`` (``h`` the
half-width), per action dimension ``d``:

* ``"exact"`` (TorchRL's :class:`~torchrl.modules.TanhNormal`):
  ``log pi = sum_d [log N(z_d; mu_d, sigma_d) - log(1 - tanh(z_d)^2) - log h_d]``,
  whose tanh correction grows without bound as ``|z|`` grows (``2 |z| - 2 log 2`` far out).
* ``"reference"`` (:class:`ReferenceTanhNormal`, the authors' form):
  ``log pi = sum_d [log N(z_d; mu_d, sigma_d) - log(1 - tanh(z_d)^2 + 1e-6) - log h_d]``,
  whose correction is at most ``-log(1e-6)``, about 13.8 nats per dimension.

The reference code squashes to ``[-1, 1]`` (Meta-World's action box), where ``log h = 0``;
on another box both forms add the same ``-log h`` of the affine rescale.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from torchrl.modules import TanhNormal

LOG_PROB_FORMS = ("exact", "reference")
REFERENCE_TANH_EPSILON = 1e-6
_LOG_EPSILON = math.log(REFERENCE_TANH_EPSILON)


def tanh_log_derivative(z: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(z)^2) = 2 (log 2 - z - softplus(-2 z))`` elementwise, stable for any ``z``."""
    return 2.0 * (math.log(2.0) - z - F.softplus(-2.0 * z))


def reference_tanh_correction(z: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(z)^2 + 1e-6)`` elementwise, computed from ``z`` as
    ``logaddexp(log(1 - tanh(z)^2), log 1e-6)``: the reference's value in exact arithmetic,
    without the round-off of ``1 - tanh(z)^2`` once ``tanh(z)`` rounds to 1."""
    return torch.logaddexp(tanh_log_derivative(z), torch.full_like(z, _LOG_EPSILON))


class ReferenceTanhNormal(TanhNormal):
    """:class:`~torchrl.modules.TanhNormal` scored with the reference's bounded tanh
    correction (module docstring). Sampling is TorchRL's.

    ``rsample_and_log_prob`` / ``sample_and_log_prob`` (what
    :func:`torchrl.objectives.sac.compute_rsample_log_prob` calls) score the pre-tanh draw
    ``z`` itself, as the reference does; :meth:`log_prob` of a given action recovers ``z``
    through TorchRL's clamped ``atanh`` (finite at ``|a| = 1``).
    Shapes: ``loc``/``scale`` ``[*B, A]``; log-probabilities ``[*B]`` (``event_dims=1``).
    """

    def _score(self, preimage: torch.Tensor) -> torch.Tensor:
        log_half_width = ((self.high - self.low) / 2).log().to(preimage.dtype).expand_as(preimage)
        per_dim = self.root_dist.log_prob(preimage) - reference_tanh_correction(preimage) - log_half_width
        return per_dim.flatten(per_dim.ndim - self._event_dims).sum(-1) if self._event_dims else per_dim

    def rsample_and_log_prob(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        preimage = self.root_dist.rsample(torch.Size(sample_shape))
        return self.transforms[0](preimage), self._score(preimage)

    def sample_and_log_prob(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        preimage = self.root_dist.sample(torch.Size(sample_shape))
        with torch.no_grad():
            sample = self.transforms[0](preimage)
        return sample, self._score(preimage)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._score(self.transforms[0].inv(value))


def tanh_normal_class(log_prob: str) -> type[TanhNormal]:
    """The distribution class of a log-probability form (:data:`LOG_PROB_FORMS`)."""
    if log_prob not in LOG_PROB_FORMS:
        raise ValueError(f"Unknown log_prob {log_prob!r}; accepted: {list(LOG_PROB_FORMS)}.")
    return ReferenceTanhNormal if log_prob == "reference" else TanhNormal
