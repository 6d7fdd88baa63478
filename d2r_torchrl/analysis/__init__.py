"""Routing statistics and plots of trained D2R runs (``python -m d2r_torchrl.analysis RUN_DIR``)."""
from d2r_torchrl.analysis.statistics import (
    LogitSpread,
    RoutingStatistics,
    logit_spread,
    routing_statistics,
    summarise_routes,
)

__all__ = ["LogitSpread", "RoutingStatistics", "logit_spread", "routing_statistics", "summarise_routes"]
