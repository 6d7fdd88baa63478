"""Meta-World multi-task environments as one batched TorchRL env (batch ``[T]``).

Each task is its own ``gym.make("Meta-World/MT1", env_name=...)`` env. With
``execution="serial"`` the ``T`` gymnasium envs are stepped in one loop by a
:class:`MetaWorldBatchEnv`, so TorchRL's per-step work (tensordicts, done checks,
transforms) is paid once per batch, not once per task as with a ``SerialEnv`` of
``GymWrapper`` s; with ``execution="parallel"`` each task is a ``GymWrapper`` in a worker
process of a ``ParallelEnv``. The project's transforms run once, on the batched env.

Keys (batch ``[T]``): ``observation`` ``[T, 39]`` float32, ``task_id`` ``[T]`` int64,
``reward`` ``[T, 1]`` float32, ``done``/``terminated``/``truncated`` ``[T, 1]`` bool,
``success`` ``[T, 1]`` bool (this step), ``episode_success`` ``[T, 1]`` bool (any step
since the last reset), ``step_count`` ``[T, 1]`` int64.
"""
from __future__ import annotations

import functools
from typing import Literal, Sequence

import gymnasium as gym
import metaworld  # noqa: F401  (registers the Meta-World gymnasium ids)
import numpy as np
import torch
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import (
    Compose,
    EnvBase,
    GymWrapper,
    ParallelEnv,
    RewardScaling,
    StepCounter,
    Transform,
    TransformedEnv,
)
from torchrl.envs.gym_like import BaseInfoDictReader

from d2r_torchrl import argument_checks as check

BENCHMARKS: dict[str, tuple[str, ...]] = {
    "MT10": tuple(MT10_V3),
    "MT50": tuple(ALL_V3_ENVIRONMENTS),
}
GOAL_MODES = ("fixed", "random")
EXECUTION_MODES = ("serial", "parallel")
REWARD_VERSIONS = ("v1", "v2")
METAWORLD_MAX_PATH_LENGTH = 500


def resolve_tasks(benchmark: str | Sequence[str]) -> tuple[str, ...]:
    """``"MT10"``, ``"MT50"``, one task name, comma-separated task names
    (``"reach-v3,push-v3"``) or a list of task names -> task names."""
    if isinstance(benchmark, str):
        if benchmark in BENCHMARKS:
            return BENCHMARKS[benchmark]
        names: Sequence[str] = tuple(benchmark.split(","))
    else:
        names = tuple(benchmark)
    if not names:
        raise ValueError("The task list is empty; give 'MT10', 'MT50', a task name or a list of them.")
    unknown = [name for name in names if name not in ALL_V3_ENVIRONMENTS]
    if unknown:
        raise ValueError(
            f"Unknown benchmark or task name(s) {unknown}. Accepted: 'MT10', 'MT50', or task "
            f"names among {sorted(ALL_V3_ENVIRONMENTS)}."
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Duplicate task names {duplicates}; each task may appear once.")
    return tuple(names)


class SuccessReader(BaseInfoDictReader):
    """Reads Meta-World's ``info["success"]`` (a Python float) into a bool ``success``."""

    def __call__(self, info_dict: dict, tensordict: TensorDictBase) -> TensorDictBase:
        success = bool(info_dict.get("success", 0.0))
        tensordict.set("success", torch.tensor([success], device=tensordict.device))
        return tensordict

    @property
    def info_spec(self) -> dict:
        return {"success": Categorical(2, shape=(1,), dtype=torch.bool)}


class MetaWorldBatchEnv(EnvBase):
    """``T`` gymnasium envs (one per task) stepped one after the other as one TorchRL env
    of batch ``[T]``, with the keys of a ``GymWrapper`` reading ``info["success"]``:
    ``observation`` float32 ``[T, 39]``, ``reward`` float32 ``[T, 1]``,
    ``done``/``terminated``/``truncated`` and ``success`` bool ``[T, 1]``.

    A partial reset (``"_reset"`` in the input) resets only the flagged envs; the entries
    of the others are taken from the input by ``EnvBase.reset``. ``set_seed(seed)`` resets
    env ``i`` with seed ``seed + i``.
    """

    def __init__(self, envs: Sequence[gym.Env]) -> None:
        super().__init__(batch_size=[len(envs)], device="cpu")
        self._envs = list(envs)
        num_envs = len(self._envs)
        self._observation_shape = (num_envs, *self._envs[0].observation_space.shape)
        action_space = self._envs[0].action_space

        def flag() -> Categorical:
            return Categorical(2, shape=(num_envs, 1), dtype=torch.bool)

        self.action_spec = Bounded(
            low=torch.as_tensor(action_space.low).expand(num_envs, *action_space.shape).clone(),
            high=torch.as_tensor(action_space.high).expand(num_envs, *action_space.shape).clone(),
            shape=(num_envs, *action_space.shape),
            dtype=torch.float32,
        )
        self.observation_spec = Composite(
            observation=Unbounded(shape=self._observation_shape, dtype=torch.float32),
            success=flag(),
            shape=(num_envs,),
        )
        self.reward_spec = Unbounded(shape=(num_envs, 1), dtype=torch.float32)
        self.done_spec = Composite(done=flag(), terminated=flag(), truncated=flag(), shape=(num_envs,))

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get("action").detach().numpy()
        observation = np.empty(self._observation_shape, dtype=np.float32)
        scalars = np.empty((len(self._envs), 4))  # reward, terminated, truncated, success
        for i, (env, action) in enumerate(zip(self._envs, actions)):
            obs, reward, terminated, truncated, info = env.step(action)
            observation[i] = obs
            scalars[i] = reward, terminated, truncated, info.get("success", 0.0)
        flags = {
            key: torch.from_numpy(scalars[:, k : k + 1] != 0)
            for k, key in enumerate(("terminated", "truncated", "success"), start=1)
        }
        # every value already has the batch shape and device: skip TensorDict's checks, as
        # TorchRL's GymWrapper does
        return TensorDict._new_unsafe(
            {
                "observation": torch.from_numpy(observation),
                "reward": torch.from_numpy(scalars[:, :1].astype(np.float32)),
                **flags,
                "done": flags["terminated"] | flags["truncated"],
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        to_reset = [True] * len(self._envs) if reset is None else reset.reshape(-1).tolist()
        observation = np.zeros(self._observation_shape, dtype=np.float32)
        success = np.zeros((len(self._envs), 1), dtype=bool)
        for i, (env, reset_i) in enumerate(zip(self._envs, to_reset)):
            if reset_i:
                obs, info = env.reset(**kwargs)
                observation[i] = obs
                success[i] = info.get("success", 0.0)
        not_done = torch.zeros((len(self._envs), 1), dtype=torch.bool)
        return TensorDict(
            {
                "observation": torch.from_numpy(observation),
                "success": torch.from_numpy(success),
                "terminated": not_done,
                "truncated": not_done.clone(),
                "done": not_done.clone(),
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        for i, env in enumerate(self._envs):
            env.reset(seed=None if seed is None else seed + i)

    def close(self, *, raise_if_closed: bool = True) -> None:
        for env in self._envs:
            env.close()
        super().close(raise_if_closed=raise_if_closed)


class TaskIdTransform(Transform):
    """Writes the constant ``task_id`` (int64, shape = the env's batch shape) at every reset
    and step: ``task_ids`` is one id (an env of batch ``[]``) or one id per sub-env."""

    def __init__(self, task_ids: int | Sequence[int]) -> None:
        super().__init__(in_keys=[], out_keys=["task_id"])
        self.register_buffer("task_ids", torch.as_tensor(task_ids, dtype=torch.int64))

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return next_tensordict.set("task_id", self.task_ids.clone())

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset.set("task_id", self.task_ids.clone())

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        observation_spec["task_id"] = Unbounded(
            shape=observation_spec.shape, dtype=torch.int64, device=observation_spec.device
        )
        return observation_spec


class EpisodeSuccessTransform(Transform):
    """``episode_success = success at any step since the last reset`` (bool ``[..., 1]``).

    On a partial reset (``"_reset"`` set for some sub-envs only) the other sub-envs keep
    their running value.
    """

    def __init__(self) -> None:
        super().__init__(in_keys=["success"], out_keys=["episode_success"])

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        previous = tensordict.get("episode_success", None)
        success = next_tensordict.get("success")
        if previous is not None:
            success = success | previous
        return next_tensordict.set("episode_success", success)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        previous = tensordict.get("episode_success", None)
        reset = tensordict.get("_reset", None)
        if previous is None or reset is None:
            value = torch.zeros(
                (*tensordict_reset.batch_size, 1), dtype=torch.bool, device=tensordict_reset.device
            )
        else:
            value = previous & ~reset
        return tensordict_reset.set("episode_success", value)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        observation_spec["episode_success"] = Categorical(
            2, shape=(*observation_spec.shape, 1), dtype=torch.bool, device=observation_spec.device
        )
        return observation_spec


def make_gym_task_env(
    task_name: str,
    *,
    seed: int,
    goals: Literal["fixed", "random"],
    max_episode_steps: int,
    reward_function_version: str,
) -> gym.Env:
    """The raw gymnasium env of one task; with fixed goals its goal is drawn once from
    ``seed`` and kept at every later reset."""
    env = gym.make(
        "Meta-World/MT1",
        env_name=task_name,
        seed=seed,
        max_episode_steps=max_episode_steps,
        reward_function_version=reward_function_version,
        disable_env_checker=True,
    )
    env.unwrapped.max_path_length = max(max_episode_steps, METAWORLD_MAX_PATH_LENGTH)
    # Meta-World adds its own TimeLimit(max_path_length=500) under gym.make's; give every
    # TimeLimit the configured limit, else episodes longer than 500 steps end at 500.
    wrapper = env
    while isinstance(wrapper, gym.Wrapper):
        if isinstance(wrapper, gym.wrappers.TimeLimit):
            wrapper._max_episode_steps = max_episode_steps
        wrapper = wrapper.env
    if goals == "fixed":
        env.reset(seed=seed)
        env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
    return env


def make_gym_wrapper(
    task_name: str,
    *,
    seed: int,
    goals: Literal["fixed", "random"],
    max_episode_steps: int,
    reward_function_version: str,
) -> GymWrapper:
    """One task as a ``GymWrapper`` (batch ``[]``) with the keys of :class:`MetaWorldBatchEnv`,
    seeded with ``seed``. The project's other keys come from :func:`task_transforms`."""
    gym_env = make_gym_task_env(
        task_name,
        seed=seed,
        goals=goals,
        max_episode_steps=max_episode_steps,
        reward_function_version=reward_function_version,
    )
    env = GymWrapper(gym_env, device="cpu")
    env.set_info_dict_reader(SuccessReader())
    observation_spec = env.observation_spec.clone()
    # float32, unbounded: Meta-World's observations can leave their Box bounds
    observation_spec["observation"] = Unbounded(
        shape=observation_spec["observation"].shape, dtype=torch.float32
    )
    env.observation_spec = observation_spec
    env.set_seed(seed)
    return env


def task_transforms(task_ids: int | Sequence[int], reward_scale: float) -> Compose:
    """``task_id``, ``episode_success``, ``step_count`` and the reward scale, for one task env
    (``task_ids`` an int) or a batch of them (one id per sub-env)."""
    transforms: list[Transform] = [
        TaskIdTransform(task_ids),
        EpisodeSuccessTransform(),
        StepCounter(),
    ]
    if reward_scale != 1.0:
        transforms.append(RewardScaling(loc=0.0, scale=reward_scale, in_keys=["reward"]))
    return Compose(*transforms)


def make_task_env(
    task_name: str,
    task_id: int,
    *,
    seed: int,
    goals: Literal["fixed", "random"],
    max_episode_steps: int,
    reward_scale: float,
    reward_function_version: str,
) -> TransformedEnv:
    """One task as a TorchRL env (batch ``[]``) with the project's keys."""
    base = make_gym_wrapper(
        task_name,
        seed=seed,
        goals=goals,
        max_episode_steps=max_episode_steps,
        reward_function_version=reward_function_version,
    )
    return TransformedEnv(base, task_transforms(task_id, reward_scale))


def make_env(
    benchmark: str | Sequence[str] = "MT10",
    *,
    goals: Literal["fixed", "random"] = "random",
    seed: int = 0,
    max_episode_steps: int = METAWORLD_MAX_PATH_LENGTH,
    reward_scale: float = 1.0,
    reward_function_version: Literal["v1", "v2"] = "v2",
    execution: Literal["serial", "parallel"] = "serial",
    first_task_id: int = 0,
) -> EnvBase:
    """Meta-World tasks as one TorchRL env with batch size ``[T]``, sub-env ``i`` = task ``i``.

    Args:
        benchmark: ``"MT10"``, ``"MT50"``, one task name (``"reach-v3"``) or a list of names.
        goals: ``"fixed"`` (one goal per task for the run, drawn from ``seed``) or
            ``"random"`` (a new pre-sampled goal at every reset).
        seed: base seed; task ``i`` is seeded with ``seed + i``.
        max_episode_steps: time limit, a truncation (``truncated``), never a termination.
        reward_scale: multiplies rewards (0.1 in the D2R reference runs).
        reward_function_version: Meta-World reward version, ``"v1"`` or ``"v2"``.
        execution: ``"serial"`` (in-process :class:`MetaWorldBatchEnv`, fastest) or
            ``"parallel"`` (``ParallelEnv``, one process per task).
        first_task_id: ``task_id`` of the first task (a collector worker holding a slice
            of a benchmark keeps the benchmark's ids).
    """
    tasks = resolve_tasks(benchmark)
    _check_choice("goals", goals, GOAL_MODES)
    _check_choice("execution", execution, EXECUTION_MODES)
    _check_choice("reward_function_version", reward_function_version, REWARD_VERSIONS)
    if not isinstance(max_episode_steps, int) or max_episode_steps <= 0:
        raise ValueError(f"max_episode_steps must be a positive integer, got {max_episode_steps!r}.")
    check.finite("reward_scale", reward_scale, positive=True)
    check.non_negative_int("first_task_id", first_task_id)
    check.seed("seed", seed, span=first_task_id + len(tasks))
    task_ids = [first_task_id + i for i in range(len(tasks))]
    gym_kwargs = {
        "goals": goals,
        "max_episode_steps": max_episode_steps,
        "reward_function_version": reward_function_version,
    }
    if execution == "serial":
        gym_envs = [
            make_gym_task_env(name, seed=seed + task_id, **gym_kwargs)
            for task_id, name in zip(task_ids, tasks)
        ]
        base: EnvBase = MetaWorldBatchEnv(gym_envs)
        base.set_seed(seed + first_task_id)  # env i: seed + first_task_id + i, as built
    else:
        factories = [
            functools.partial(make_gym_wrapper, name, seed=seed + task_id, **gym_kwargs)
            for task_id, name in zip(task_ids, tasks)
        ]
        base = ParallelEnv(len(tasks), factories, mp_start_method="spawn")
    env = TransformedEnv(base, task_transforms(task_ids, reward_scale))
    env.task_names = tasks
    return env


def _check_choice(name: str, value: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"Unknown {name} {value!r}; accepted: {list(accepted)}.")
