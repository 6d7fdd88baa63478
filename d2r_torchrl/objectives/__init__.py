"""Loss modules."""
from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss, per_task_mean

__all__ = ["MultiTaskSACLoss", "per_task_mean"]
