"""Meta-World multi-task environments as one batched TorchRL env (batch ``[T]``).

Each task is its own ``gym.make("Meta-World/MT1", env_name=...)`` env wrapped in a
``GymWrapper`` and a few transforms; the ``T`` task envs are stepped together by a
``SerialEnv`` (in-process) or a ``ParallelEnv`` (one worker process per task).

Keys per sub-env (batch ``[T]`` once stacked): ``observation`` ``[39]`` float32,
``task_id`` ``[]`` int64, ``reward`` ``[1]``, ``done``/``terminated``/``truncated``
``[1]`` bool, ``success`` ``[1]`` bool (this step), ``episode_success`` ``[1]`` bool
(any step so far), ``step_count`` ``[1]`` int64.
"""
from __future__ import annotations

import functools
from typing import Literal, Sequence

import gymnasium as gym
import metaworld  # noqa: F401  (registers the Meta-World gymnasium ids)
import torch
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
from tensordict import TensorDictBase
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import (
    Compose,
    DoubleToFloat,
    EnvBase,
    GymWrapper,
    ParallelEnv,
    RewardScaling,
    SerialEnv,
    StepCounter,
    Transform,
    TransformedEnv,
)
from torchrl.envs.gym_like import BaseInfoDictReader

BENCHMARKS: dict[str, tuple[str, ...]] = {
    "MT10": tuple(MT10_V3),
    "MT50": tuple(ALL_V3_ENVIRONMENTS),
}
GOAL_MODES = ("fixed", "random")
EXECUTION_MODES = ("serial", "parallel")
REWARD_VERSIONS = ("v1", "v2")
METAWORLD_MAX_PATH_LENGTH = 500


def resolve_tasks(benchmark: str | Sequence[str]) -> tuple[str, ...]:
    """``"MT10"``, ``"MT50"``, one task name or a list of task names -> task names."""
    if isinstance(benchmark, str):
        if benchmark in BENCHMARKS:
            return BENCHMARKS[benchmark]
        names: Sequence[str] = (benchmark,)
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


class TaskIdTransform(Transform):
    """Writes the constant ``task_id`` (int64, shape ``[]``) at every reset and step."""

    def __init__(self, task_id: int) -> None:
        super().__init__(in_keys=[], out_keys=["task_id"])
        self.task_id = task_id

    def _value(self, tensordict: TensorDictBase) -> torch.Tensor:
        return torch.full(tensordict.batch_size, self.task_id, dtype=torch.int64, device=tensordict.device)

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return next_tensordict.set("task_id", self._value(next_tensordict))

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset.set("task_id", self._value(tensordict_reset))

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        observation_spec["task_id"] = Unbounded(
            shape=observation_spec.shape, dtype=torch.int64, device=observation_spec.device
        )
        return observation_spec


class EpisodeSuccessTransform(Transform):
    """``episode_success = success at any step since the last reset`` (bool ``[1]``)."""

    def __init__(self) -> None:
        super().__init__(in_keys=["success"], out_keys=["episode_success"])

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        previous = tensordict.get("episode_success", None)
        success = next_tensordict.get("success")
        if previous is not None:
            success = success | previous
        return next_tensordict.set("episode_success", success)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset.set(
            "episode_success",
            torch.zeros((*tensordict_reset.batch_size, 1), dtype=torch.bool, device=tensordict_reset.device),
        )

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
    gym_env = make_gym_task_env(
        task_name,
        seed=seed,
        goals=goals,
        max_episode_steps=max_episode_steps,
        reward_function_version=reward_function_version,
    )
    base = GymWrapper(gym_env, device="cpu")
    base.set_info_dict_reader(SuccessReader())
    observation_spec = base.observation_spec.clone()
    observation_spec["observation"] = Unbounded(
        shape=observation_spec["observation"].shape, dtype=torch.float64
    )
    base.observation_spec = observation_spec
    transforms = [
        DoubleToFloat(in_keys=["observation"]),
        TaskIdTransform(task_id),
        EpisodeSuccessTransform(),
        StepCounter(),
    ]
    if reward_scale != 1.0:
        transforms.append(RewardScaling(loc=0.0, scale=reward_scale, in_keys=["reward"]))
    env = TransformedEnv(base, Compose(*transforms))
    env.set_seed(seed)
    return env


def make_env(
    benchmark: str | Sequence[str] = "MT10",
    *,
    goals: Literal["fixed", "random"] = "fixed",
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
        execution: ``"serial"`` (in-process ``SerialEnv``, fastest on 2 cores) or
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
    if reward_scale <= 0:
        raise ValueError(f"reward_scale must be positive, got {reward_scale!r}.")
    factories = [
        functools.partial(
            make_task_env,
            name,
            first_task_id + task_id,
            seed=seed + first_task_id + task_id,
            goals=goals,
            max_episode_steps=max_episode_steps,
            reward_scale=reward_scale,
            reward_function_version=reward_function_version,
        )
        for task_id, name in enumerate(tasks)
    ]
    batched_cls = SerialEnv if execution == "serial" else ParallelEnv
    env = batched_cls(len(tasks), factories, mp_start_method="spawn" if execution == "parallel" else None)
    env.task_names = tasks
    return env


def _check_choice(name: str, value: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"Unknown {name} {value!r}; accepted: {list(accepted)}.")
