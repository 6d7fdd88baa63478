"""Multi-task networks (D2R and baselines) and their TorchRL actor/critic wrappers."""
from d2r_torchrl.modules.actor_critic import (
    ARCHITECTURES,
    make_actor,
    make_critic,
    make_network,
    num_route_logits,
)
from d2r_torchrl.modules.baselines import MultiTaskMLP, SoftModularNetwork
from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.modules.reference_weights import load_reference_state_dict
from d2r_torchrl.modules.routing import RoutingMode, set_routing_mode

__all__ = [
    "ARCHITECTURES",
    "D2RNetwork",
    "MultiTaskMLP",
    "RoutingMode",
    "SoftModularNetwork",
    "load_reference_state_dict",
    "make_actor",
    "make_critic",
    "make_network",
    "num_route_logits",
    "set_routing_mode",
]
