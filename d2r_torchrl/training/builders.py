"""Factories turning a :class:`RunConfig` into TorchRL components."""
from __future__ import annotations

import functools
import math
from typing import Callable

import gymnasium as gym
import torch
from torchrl.collectors import Collector, MultiAsyncCollector, MultiSyncCollector
from torchrl.data import Bounded, TensorSpec
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor
from torchrl.objectives import SoftUpdate

from d2r_torchrl.data.replay import make_replay_buffer
from d2r_torchrl.envs.metaworld import make_env, resolve_tasks
from d2r_torchrl.modules.actor_critic import make_actor, make_critic
from d2r_torchrl.modules.value_heads import HLGaussValue
from d2r_torchrl.objectives.multitask_sac import REFERENCE_REWARD_SCALE, MultiTaskSACLoss
from d2r_torchrl.objectives.value_targets import METAWORLD_MAX_REWARD, PerTaskRewardScale, soft_return_bound
from d2r_torchrl.training import evaluation
from d2r_torchrl.training.config import ConfigError, RunConfig
from d2r_torchrl.training.update import UpdateFn, make_sac_optimizers, make_update


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``cuda[:i]`` must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name} but CUDA is not available on this machine (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); use device=cpu or device=auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    return device


def task_names(config: RunConfig) -> tuple[str, ...]:
    """``env.benchmark`` may be ``MT10``, ``MT50``, a task name or comma-separated names."""
    return resolve_tasks(config.env.benchmark)


def env_factory(config: RunConfig, tasks: tuple[str, ...], *, first_task_id: int = 0, seed_offset: int = 0) -> Callable[[], EnvBase]:
    """A picklable zero-argument factory of the batched Meta-World env."""
    return functools.partial(
        make_env,
        list(tasks),
        goals=config.env.goals,
        seed=config.seed + seed_offset,
        max_episode_steps=config.env.max_episode_steps,
        reward_scale=config.env.reward_scale,
        reward_function_version=config.env.reward_function_version,
        execution=config.env.execution,
        first_task_id=first_task_id,
    )


def make_eval_envs(config: RunConfig, tasks: tuple[str, ...]) -> gym.vector.SyncVectorEnv:
    """The gymnasium vector env of Meta-World's evaluation protocol, seeded as the training
    env: the same pre-sampled goals per task (random goals) or the same goal (fixed)."""
    return evaluation.make_eval_envs(
        tasks,
        goals=config.env.goals,
        seed=config.seed,
        max_episode_steps=config.env.max_episode_steps,
        reward_function_version=config.env.reward_function_version,
    )


def network_kwargs(config: RunConfig) -> dict:
    net = config.network
    if net.architecture == "d2r":
        return dict(
            num_modules=net.num_modules,
            module_width=net.module_width,
            top_k=net.top_k,
            native_chain=config.compile.native_chain,
        )
    if net.architecture == "soft_modular":
        return dict(preset=net.soft_modular_preset)
    return {}


def policy_specs(env: EnvBase | gym.vector.VectorEnv) -> tuple[int, TensorSpec]:
    """``(observation size, action spec of one task)`` of a TorchRL env or a gymnasium vector env."""
    if isinstance(env, gym.vector.VectorEnv):
        space = env.single_action_space
        low, high = (torch.as_tensor(bound, dtype=torch.float32) for bound in (space.low, space.high))
        return env.single_observation_space.shape[-1], Bounded(low, high, shape=space.shape, dtype=torch.float32)
    action_spec = env.full_action_spec["action"]
    action_spec = action_spec[(0,) * (action_spec.ndim - 1)] if action_spec.ndim > 1 else action_spec
    return env.observation_spec["observation"].shape[-1], action_spec


def make_actor_critic(
    config: RunConfig, env: EnvBase | gym.vector.VectorEnv, num_tasks: int
) -> tuple[ProbabilisticActor, torch.nn.Module]:
    """The run's actor and twin-critic network for ``env`` (:func:`policy_specs`)."""
    return make_actor_critic_for(config, *policy_specs(env), num_tasks)


def make_actor_critic_for(
    config: RunConfig, observation_dim: int, action_spec: TensorSpec, num_tasks: int
) -> tuple[ProbabilisticActor, torch.nn.Module]:
    """The actor (``network.log_prob``) and critic (``network.critic_layer_norm``,
    ``network.critic_value_bins``) of ``config`` for observations of ``observation_dim`` and
    one task's ``action_spec``."""
    kwargs = network_kwargs(config)
    actor = make_actor(
        config.network.architecture, observation_dim, action_spec, num_tasks, log_prob=config.network.log_prob, **kwargs
    )
    bins = config.network.critic_value_bins
    bound = return_bound(config, action_spec.shape[-1]) if bins is not None else None
    critic = make_critic(
        config.network.architecture, observation_dim, action_spec.shape[-1], num_tasks,
        value_head=HLGaussValue(-bound, bound, bins) if bins is not None else None,
        layer_norm=config.network.critic_layer_norm, **kwargs,
    )
    return actor, critic


def make_loss(config: RunConfig, actor, critic, num_tasks: int) -> tuple[MultiTaskSACLoss, SoftUpdate]:
    loss = MultiTaskSACLoss(
        actor,
        critic,
        num_tasks=num_tasks,
        loss_balancing=config.loss.loss_balancing,
        alpha_init=config.loss.alpha_init,
        max_alpha=None if config.loss.max_log_alpha is None else math.exp(config.loss.max_log_alpha),
        extreme_loss_threshold=config.loss.extreme_loss_threshold,
        extreme_loss_rule=config.loss.extreme_loss_rule,
        # normalised rewards reach at most 1: Meta-World's 10 at the reference scale
        reward_scale=REFERENCE_REWARD_SCALE if config.loss.reward_normalization else config.env.reward_scale,
        time_limit_terminal=config.loss.time_limit_terminal,
        **critic_target_options(config, actor, num_tasks),
    )
    loss.make_value_estimator(gamma=config.loss.gamma)
    return loss, SoftUpdate(loss, tau=config.loss.target_update_tau)


def return_bound(config: RunConfig, action_dim: int) -> float:
    """:func:`soft_return_bound` of the run: rewards of at most 1 when normalised, else
    Meta-World's 10 times ``env.reward_scale``; the capped temperature; infinite-horizon unless
    time limits are terminal (``loss.time_limit_terminal``), then over ``env.max_episode_steps``."""
    loss = config.loss
    return soft_return_bound(
        1.0 if loss.reward_normalization else METAWORLD_MAX_REWARD * config.env.reward_scale,
        loss.gamma,
        max_alpha=math.exp(loss.max_log_alpha),
        action_dim=action_dim,
        horizon=config.env.max_episode_steps if loss.time_limit_terminal else None,
    )


def critic_target_options(config: RunConfig, actor: ProbabilisticActor, num_tasks: int) -> dict:
    """``td_target_bound`` (:func:`return_bound`) and ``reward_normalization`` of
    :class:`MultiTaskSACLoss` from ``loss.clip_td_target`` and ``loss.reward_normalization``.

    A task's reward scale is floored at ``env.reward_scale`` (a Meta-World reward of 1): a
    task that has shown only small rewards has them scaled up at most 10 times as much as one
    that reached Meta-World's largest, 10."""
    options: dict = {}
    if config.loss.reward_normalization:
        options["reward_normalization"] = PerTaskRewardScale(num_tasks, floor=config.env.reward_scale)
    if config.loss.clip_td_target:
        options["td_target_bound"] = return_bound(config, actor.spec["action"].shape[-1])
    return options


def make_optimizers(config: RunConfig, loss: MultiTaskSACLoss) -> dict[str, torch.optim.Optimizer]:
    """One Adam per network with the configured learning rates (:func:`make_sac_optimizers`)."""
    return make_sac_optimizers(
        loss,
        actor_lr=config.loss.actor_lr,
        critic_lr=config.loss.critic_lr,
        alpha_lr=config.loss.alpha_lr,
        capturable=config.compile.cudagraphs,
    )


def make_update_fn(
    config: RunConfig, loss: MultiTaskSACLoss, optimizers: dict[str, torch.optim.Optimizer], target_updater: SoftUpdate
) -> UpdateFn:
    """The eager or compiled update of ``config.compile`` (see :func:`make_update`)."""
    if config.compile.cudagraphs and loss.log_alpha.device.type != "cuda":
        raise ConfigError(
            f"compile.cudagraphs=true needs a CUDA device; the run is on {loss.log_alpha.device}."
        )
    return make_update(
        loss,
        optimizers,
        target_updater,
        config.loss.grad_clip_norm,
        compile=config.compile.enabled,
        mode=config.compile.mode,
        backend=config.compile.backend,
        cudagraphs=config.compile.cudagraphs,
    )


def make_buffer(config: RunConfig, num_tasks: int, scratch_dir: str | None, device: torch.device):
    return make_replay_buffer(
        config.buffer.kind,
        capacity=config.buffer.capacity,
        batch_size=config.buffer.batch_size_per_task * num_tasks,
        num_tasks=num_tasks,
        memmap_above=config.buffer.memmap_above,
        scratch_dir=scratch_dir,
        priority_alpha=config.buffer.priority_alpha,
        priority_beta=config.buffer.priority_beta,
        max_priority_ratio=config.buffer.max_priority_ratio,
        device=device,
    )


def make_collector(
    config: RunConfig, tasks: tuple[str, ...], policy, device: torch.device, frames_done: int = 0
):
    """``Collector`` over all tasks, or a multi-process (or Ray actor) collector whose
    workers each step a contiguous slice of the tasks (ids kept global). ``frames_done`` frames of
    the budget (and of a random warm-up) are already spent when resuming."""
    frames_per_batch = config.collector.steps_per_task * len(tasks)
    # With random goals a resumed run must not replay its first resets; fixed goals come from the seed.
    seed_offset = 0 if config.env.goals == "fixed" else frames_done // frames_per_batch
    warmup_frames = config.collector.warmup_rounds * frames_per_batch - frames_done
    random_warmup = config.collector.warmup_policy == "random" and warmup_frames > 0
    common = dict(
        frames_per_batch=frames_per_batch,
        total_frames=config.collector.total_steps_per_task * len(tasks) - frames_done,
        init_random_frames=warmup_frames if random_warmup else None,
        policy_device=device,
        env_device="cpu",
        storing_device="cpu",
        auto_register_policy_transforms=False,
    )
    if config.collector.kind == "sync":
        return Collector(env_factory(config, tasks, seed_offset=seed_offset), policy, **common)
    workers = min(config.collector.num_workers, len(tasks))
    bounds = [round(i * len(tasks) / workers) for i in range(workers + 1)]
    factories = [
        env_factory(config, tasks[lo:hi], first_task_id=lo, seed_offset=seed_offset)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    if config.collector.kind == "ray":
        from d2r_torchrl.training.ray_collector import make_ray_collector

        return make_ray_collector(factories, policy, **common)
    cls = MultiSyncCollector if config.collector.kind == "multi_sync" else MultiAsyncCollector
    common["frames_per_batch"] = frames_per_batch if cls is MultiSyncCollector else frames_per_batch // workers
    return cls(factories, policy, **common)
