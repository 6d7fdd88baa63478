"""The training pipeline: configuration, the trainer (collect, extend, sample, update,
evaluate, checkpoint), evaluation and the command line of the recipes."""
from d2r_torchrl.training.config import ConfigError, RunConfig, apply_overrides, preset
from d2r_torchrl.training.trainer import MultiTaskTrainer

__all__ = ["ConfigError", "RunConfig", "MultiTaskTrainer", "apply_overrides", "preset"]
