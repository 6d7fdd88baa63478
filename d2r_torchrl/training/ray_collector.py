"""Environment workers as Ray actors: TorchRL's ``RayCollector`` with task slices.

Each worker is one Ray actor running a TorchRL ``Collector`` over a contiguous slice of
the tasks (``task_id`` kept global, see ``env_factory(first_task_id=...)``) on the CPU; the
learner keeps its policy on its own device (GPU) and pushes the weights to every worker
with ``update_policy_weights_()`` after each update round. Batches are gathered
synchronously: one round is ``[workers, tasks per worker, steps per task]``.

Ray is an optional dependency (``pip install -e ".[ray]"``). When Ray is not initialised
in the process, the collector connects to the cluster named by ``RAY_ADDRESS`` or to one
started on this machine with ``ray start``, else starts a local one.
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Callable, Sequence

import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.collectors.distributed import RayCollector
from torchrl.envs import EnvBase

from d2r_torchrl.training.config import ConfigError

WORKER_RESOURCES = {"num_cpus": 1, "num_gpus": 0}


def require_ray() -> None:
    """Raise :class:`ConfigError` with the install command when Ray is missing."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError('collector.kind=ray and sweeps need the ray package: pip install -e ".[ray]"')


class TaskSliceCollector(Collector):
    """The Collector each Ray actor runs; a one-line repr keeps Ray's log prefixes short."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(worker={self.worker_idx})"


class LearnerRayCollector(RayCollector):
    """``RayCollector`` that pushes ``learner_policy``'s current weights (on any device)
    when ``update_policy_weights_()`` is called without weights."""

    def __init__(self, *args, learner_policy: torch.nn.Module, **kwargs) -> None:
        self.learner_policy = learner_policy
        super().__init__(*args, **kwargs)

    def update_policy_weights_(self, policy_or_weights=None, **kwargs) -> None:
        if policy_or_weights is None:
            policy_or_weights = TensorDict.from_module(self.learner_policy).data
        super().update_policy_weights_(policy_or_weights, **kwargs)


def make_ray_collector(
    env_factories: Sequence[Callable[[], EnvBase]],
    policy: torch.nn.Module,
    *,
    frames_per_batch: int,
    total_frames: int,
    init_random_frames: int | None,
    **collector_kwargs,
) -> LearnerRayCollector:
    """A synchronous Ray collector with one CPU actor per env factory, weights pushed.

    ``frames_per_batch`` counts all workers together and must split evenly between them;
    ``collector_kwargs`` go to each worker's ``Collector`` (its devices are the CPU).
    """
    require_ray()
    for key in ("policy_device", "env_device", "storing_device", "device"):
        collector_kwargs.pop(key, None)
    collector = LearnerRayCollector(
        list(env_factories),
        copy.deepcopy(policy).to("cpu"),  # pickled to the CPU-only actors
        learner_policy=policy,
        frames_per_batch=frames_per_batch,
        total_frames=total_frames,
        init_random_frames=init_random_frames or 0,
        collector_class=TaskSliceCollector,
        collector_kwargs=collector_kwargs,
        remote_configs=dict(WORKER_RESOURCES),
        sync=True,
        device="cpu",
    )
    collector.update_policy_weights_()
    return collector
