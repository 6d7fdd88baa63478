"""Routing statistics of a D2R network: which modules feed which, and how deep, per task."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.modules.routing import RoutingMode, route_depth, set_routing_mode
from d2r_torchrl.objectives.multitask_sac import per_task_mean


@dataclass
class RoutingStatistics:
    """Per-task routing summary.

    Attributes:
        edge_frequency: ``[T, N, N]``; entry ``[t, g, j]`` is the fraction of task ``t``'s
            states whose gate ``g`` (row ``g < N - 1`` feeds module ``g + 2``, the last row
            feeds the output head) selects module ``j + 1``.
        mean_depth: ``[T]`` mean number of modules on the longest chain of the route.
        samples: ``[T]`` states per task.
    """

    edge_frequency: torch.Tensor
    mean_depth: torch.Tensor
    samples: torch.Tensor


def summarise_routes(selected: torch.Tensor, task_id: torch.Tensor, num_tasks: int) -> RoutingStatistics:
    """Statistics of given routes ``selected`` ``[M, N, N]`` bool of tasks ``task_id`` ``[M]``."""
    flat = selected.flatten(-2).float().transpose(0, 1)
    frequency, counts = per_task_mean(flat, task_id, num_tasks)
    depth, _ = per_task_mean(route_depth(selected).float(), task_id, num_tasks)
    num_modules = selected.shape[-1]
    return RoutingStatistics(
        edge_frequency=frequency.transpose(0, 1).reshape(num_tasks, num_modules, num_modules),
        mean_depth=depth,
        samples=counts,
    )


@torch.no_grad()
def routing_statistics(network: D2RNetwork, features: torch.Tensor, task_id: torch.Tensor) -> RoutingStatistics:
    """Top-k (deterministic) routes of ``network`` on ``features`` ``[M, in]``, summarised per task."""
    with set_routing_mode(RoutingMode.TOPK):
        _, _, flat_route = network(features, task_id)
    selected = network.layout.pad(flat_route, fill=False)
    return summarise_routes(selected, task_id.reshape(-1).long(), network.num_tasks)
