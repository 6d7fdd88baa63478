"""d2r-torchrl: Dynamic Depth Routing multi-task RL as TorchRL components.

Importing the package needs no compiled torchrl extension; building a prioritized replay
buffer checks for it (:func:`d2r_torchrl.data.replay.make_replay_buffer`).
"""

__version__ = "0.1.0"
