"""Routing statistics and plots of trained D2R runs (``python -m d2r_torchrl.analysis RUN_DIR``)."""
from d2r_torchrl.analysis.statistics import (
    DepthTest,
    LogitSpread,
    RoutingStatistics,
    depth_test,
    logit_spread,
    routing_statistics,
    summarise_routes,
)

__all__ = [
    "DepthTest",
    "LogitSpread",
    "RoutingStatistics",
    "depth_test",
    "logit_spread",
    "routing_statistics",
    "summarise_routes",
]
