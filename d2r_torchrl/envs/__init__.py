"""Meta-World multi-task environments for TorchRL."""
from d2r_torchrl.envs.metaworld import BENCHMARKS, make_env, make_task_env, resolve_tasks

__all__ = ["BENCHMARKS", "make_env", "make_task_env", "resolve_tasks"]
