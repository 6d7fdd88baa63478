"""d2r-torchrl: Dynamic Depth Routing multi-task RL as TorchRL components."""
from d2r_torchrl._extension import require_torchrl_extension

require_torchrl_extension()

__version__ = "0.1.0"
