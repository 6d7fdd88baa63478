"""Routing statistics of a D2R network: which modules feed which, how deep, and how much
the router's logits depend on the state and the task."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.modules.routing import RoutingMode, modules_reached, route_depth, set_routing_mode
from d2r_torchrl.objectives.multitask_sac import per_task_mean


@dataclass
class LogitSpread:
    """How much the router's logits move, in logit units (population standard deviations).

    Attributes:
        within_task: ``[T]`` std of each logit over the task's states, averaged over logits:
            how much routing depends on the state.
        across_tasks: std over tasks of each logit's per-task mean, averaged over logits:
            how much routing depends on the task.
        across_logits: std over logits of their overall mean: the input-independent
            preference for some edges. When it dwarfs the other two, every state of every
            task takes (nearly) the same top-k route.
    """

    within_task: torch.Tensor
    across_tasks: float
    across_logits: float


def logit_spread(logits: torch.Tensor, task_id: torch.Tensor, num_tasks: int) -> LogitSpread:
    """:class:`LogitSpread` of router logits ``[M, L]`` of tasks ``task_id`` ``[M]``.

    Tasks without states count as zero spread within and are left out across tasks.
    Computed in float64 and in two passes (deviations from the task mean), because the
    within-task spread can be thousands of times smaller than the logits themselves.
    """
    logits = logits.double()
    mean, counts = per_task_mean(logits.transpose(0, 1), task_id, num_tasks)  # [L, T]
    deviation = logits - mean.transpose(0, 1)[task_id]
    variance, _ = per_task_mean(deviation.square().transpose(0, 1), task_id, num_tasks)
    present = mean[:, counts > 0]
    return LogitSpread(
        within_task=variance.sqrt().mean(0).float(),
        across_tasks=float(present.std(1, correction=0).mean()),
        across_logits=float(logits.mean(0).std(correction=0)),
    )


@dataclass
class RoutingStatistics:
    """Per-task routing summary.

    Attributes:
        edge_frequency: ``[T, N, N]``; entry ``[t, g, j]`` is the fraction of task ``t``'s
            states whose gate ``g`` (row ``g < N - 1`` feeds module ``g + 2``, the last row
            feeds the output head) selects module ``j + 1``.
        mean_depth: ``[T]`` mean number of modules on the longest chain of the route.
        mean_modules: ``[T]`` mean number of modules the route runs (those the output
            reaches, :func:`~d2r_torchrl.modules.routing.modules_reached`).
        depth_histogram: ``[T, N]``; entry ``[t, d]`` counts task ``t``'s states whose
            route has depth ``d + 1``.
        samples: ``[T]`` states per task.
        spread: router-logit spread, when the logits were given.
    """

    edge_frequency: torch.Tensor
    mean_depth: torch.Tensor
    mean_modules: torch.Tensor
    depth_histogram: torch.Tensor
    samples: torch.Tensor
    spread: LogitSpread | None = None


def summarise_routes(
    selected: torch.Tensor, task_id: torch.Tensor, num_tasks: int, logits: torch.Tensor | None = None
) -> RoutingStatistics:
    """Statistics of given routes ``selected`` ``[M, N, N]`` bool of tasks ``task_id`` ``[M]``
    (and, with the router's flat ``logits`` ``[M, L]``, their spread)."""
    flat = selected.flatten(-2).float().transpose(0, 1)
    frequency, counts = per_task_mean(flat, task_id, num_tasks)
    depths = route_depth(selected)
    depth, _ = per_task_mean(depths.float(), task_id, num_tasks)
    modules, _ = per_task_mean(modules_reached(selected).sum(-1).float(), task_id, num_tasks)
    num_modules = selected.shape[-1]
    histogram = torch.zeros(num_tasks * num_modules, dtype=torch.long)
    histogram.index_add_(0, (task_id * num_modules + depths - 1).cpu(), torch.ones_like(depths).cpu())
    return RoutingStatistics(
        edge_frequency=frequency.transpose(0, 1).reshape(num_tasks, num_modules, num_modules),
        mean_depth=depth,
        mean_modules=modules,
        depth_histogram=histogram.view(num_tasks, num_modules),
        samples=counts,
        spread=None if logits is None else logit_spread(logits, task_id, num_tasks),
    )


@torch.no_grad()
def routing_statistics(network: D2RNetwork, features: torch.Tensor, task_id: torch.Tensor) -> RoutingStatistics:
    """Top-k (deterministic) routes of ``network`` on ``features`` ``[M, in]``, summarised per task."""
    with set_routing_mode(RoutingMode.TOPK):
        _, flat_logits, flat_route = network(features, task_id)
    selected = network.layout.pad(flat_route, fill=False)
    return summarise_routes(selected, task_id.reshape(-1).long(), network.num_tasks, flat_logits)


class DepthTest(NamedTuple):
    """Kruskal-Wallis test of "route depth has the same distribution in every task" over
    the states of the tasks that have some. States of one episode are correlated, so the
    p-value overstates the evidence; repeat over seeds before concluding."""

    statistic: float
    p_value: float


def depth_test(depth_histogram: torch.Tensor) -> DepthTest:
    """:class:`DepthTest` from per-task depth counts ``[T, N]`` (see :class:`RoutingStatistics`).
    Every state at the same depth gives ``statistic=0, p_value=1``."""
    depths = np.arange(1, depth_histogram.shape[-1] + 1)
    samples = [np.repeat(depths, counts) for counts in depth_histogram.cpu().numpy() if counts.sum()]
    if len(samples) < 2:
        raise ValueError(f"Comparing depths needs states of two tasks or more, got {len(samples)}.")
    if len({value for sample in samples for value in np.unique(sample)}) == 1:
        return DepthTest(0.0, 1.0)
    try:
        from scipy.stats import kruskal
    except ImportError as error:
        raise ImportError("The depth test needs scipy: pip install 'd2r-torchrl[analysis]'.") from error
    result = kruskal(*samples)
    return DepthTest(float(result.statistic), float(result.pvalue))
