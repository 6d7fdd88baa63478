"""Tests of the Meta-World env factory against raw Meta-World envs (real simulation, small)."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import gymnasium as gym
import numpy as np
import pytest
import torch
from metaworld.policies import ENV_POLICY_MAP
from tensordict import TensorDict
from torchrl.envs import EnvBase
from torchrl.envs.utils import check_env_specs, step_mdp

from d2r_torchrl.envs import make_env, resolve_tasks
from d2r_torchrl.envs.metaworld import EpisodeSuccessTransform

# With seed 1, task i is seeded 1 + i: reach-v3 (seed 2) with fixed goals succeeds from its
# 39th scripted step, and loses success once the hand is driven away at step 45.
TASKS = ("push-v3", "reach-v3")
SEED = 1
EPISODE = 60
AWAY_FROM = 45


@pytest.fixture
def make() -> Iterator[Callable[..., EnvBase]]:
    """``make_env`` that closes every env it built (parallel workers included) at teardown."""
    built: list[EnvBase] = []

    def _make(*args, **kwargs) -> EnvBase:
        built.append(make_env(*args, **kwargs))
        return built[-1]

    yield _make
    for env in built:
        env.close()


def raw_envs(tasks: Sequence[str], seed: int, goals: str, max_episode_steps: int) -> list[gym.Env]:
    """Raw Meta-World envs put through the same seed/reset sequence as ``make_env``:
    seed ``seed + i`` at construction; with fixed goals one reset draws the goal and
    goal sampling is turned off; TorchRL's ``set_seed`` then resets once more."""
    envs = []
    for i, name in enumerate(tasks):
        env = gym.make(
            "Meta-World/MT1",
            env_name=name,
            seed=seed + i,
            max_episode_steps=max_episode_steps,
            disable_env_checker=True,
        )
        if goals == "fixed":
            env.reset(seed=seed + i)
            env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
        env.reset(seed=seed + i)
        envs.append(env)
    return envs


def scripted_action(task: str, obs: np.ndarray, step_in_episode: int) -> np.ndarray:
    """Meta-World's scripted policy, then full speed away from the goal (so success
    can turn on and off again within an episode)."""
    if step_in_episode < AWAY_FROM:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high", harmless
            action = ENV_POLICY_MAP[task]().get_action(obs)
    else:
        action = np.r_[np.sign(obs[:3] - obs[-3:]), 0.0]
    return action.astype(np.float32)


def f32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


@pytest.mark.parametrize("goals", ["fixed", "random"])
def test_matches_raw_metaworld(make: Callable[..., EnvBase], goals: str) -> None:
    """Same seeds and actions -> same observations, scaled rewards, success and truncation,
    over two episodes (so the reset after truncation is compared too)."""
    scale = 0.1
    env = make(TASKS, goals=goals, seed=SEED, max_episode_steps=EPISODE, reward_scale=scale)
    raws = raw_envs(TASKS, SEED, goals, EPISODE)
    obs = [raw.reset()[0] for raw in raws]
    td = env.reset()
    torch.testing.assert_close(td["observation"], f32(obs), rtol=0, atol=0)
    successes = []
    for t in range(2 * EPISODE + 5):
        actions = np.stack([scripted_action(name, o, t % EPISODE) for name, o in zip(TASKS, obs)])
        td["action"] = torch.from_numpy(actions)
        td, td_root = env.step_and_maybe_reset(td)
        results = [raw.step(a) for raw, a in zip(raws, actions)]
        obs = [r[0] for r in results]
        torch.testing.assert_close(td["next", "observation"], f32(obs), rtol=0, atol=0)
        torch.testing.assert_close(td["next", "reward"], f32([[r[1] * scale] for r in results]))
        success = torch.tensor([[bool(r[4]["success"])] for r in results])
        torch.testing.assert_close(td["next", "success"], success)
        torch.testing.assert_close(td["next", "terminated"], torch.tensor([[r[2]] for r in results]))
        torch.testing.assert_close(td["next", "truncated"], torch.tensor([[r[3]] for r in results]))
        successes.append(success)
        obs = [raw.reset()[0] if r[3] else o for raw, r, o in zip(raws, results, obs)]
        torch.testing.assert_close(td_root["observation"], f32(obs), rtol=0, atol=0)
        td = td_root
    if goals == "fixed":  # the comparison saw both success values
        assert torch.stack(successes).any() and not torch.stack(successes).all()


def test_fixed_goals_stay_fixed(make: Callable[..., EnvBase]) -> None:
    env = make(["reach-v3"], goals="fixed", seed=0, max_episode_steps=5)
    raw = raw_envs(["reach-v3"], 0, "fixed", 5)[0]
    raw.reset()
    first = env.reset()["observation"]
    torch.testing.assert_close(first[0, -3:], f32(raw.unwrapped._target_pos), rtol=0, atol=0)
    for _ in range(3):
        env.rollout(7, break_when_any_done=False)  # crosses a truncation and auto-reset
        torch.testing.assert_close(env.reset()["observation"], first, rtol=0, atol=0)
    other_seed = make(["reach-v3"], goals="fixed", seed=1, max_episode_steps=5).reset()["observation"]
    assert not torch.equal(other_seed[0, -3:], first[0, -3:])


def test_random_goals_change(make: Callable[..., EnvBase]) -> None:
    env = make(["reach-v3"], goals="random", seed=0, max_episode_steps=5)
    goals = {tuple(env.reset()["observation"][0, -3:].tolist()) for _ in range(5)}
    assert len(goals) > 1


def test_task_ids_follow_task_order(make: Callable[..., EnvBase]) -> None:
    tasks = ["window-close-v3", "reach-v3", "drawer-open-v3"]
    env = make(tasks, max_episode_steps=3)
    assert tuple(env.task_names) == tuple(tasks)
    assert env.reset()["task_id"].tolist() == [0, 1, 2]
    rollout = env.rollout(4, break_when_any_done=False)  # crosses a truncation
    assert rollout["task_id"].dtype == torch.int64
    assert (rollout["task_id"] == torch.arange(3)[:, None]).all()
    assert (rollout["next", "task_id"] == torch.arange(3)[:, None]).all()


def test_first_task_id_offsets_ids_and_seeds(make: Callable[..., EnvBase]) -> None:
    """A slice of a task list with ``first_task_id`` is the same as that part of the whole list."""
    whole = make(TASKS, seed=SEED, max_episode_steps=5).reset()
    part = make(TASKS[1:], seed=SEED, max_episode_steps=5, first_task_id=1).reset()
    assert part["task_id"].tolist() == [1]
    torch.testing.assert_close(part["observation"], whole["observation"][1:], rtol=0, atol=0)


@pytest.mark.parametrize("max_episode_steps", [4, 501])  # 501: beyond Meta-World's own 500 limit
def test_truncation(make: Callable[..., EnvBase], max_episode_steps: int) -> None:
    env = make(["reach-v3"], max_episode_steps=max_episode_steps)
    steps = 2 * max_episode_steps + 2
    rollout = env.rollout(steps, break_when_any_done=False)[0]
    expected_count = torch.arange(steps) % max_episode_steps + 1
    expected_truncated = (expected_count == max_episode_steps)[:, None]
    assert torch.equal(rollout["next", "step_count"].squeeze(-1), expected_count)
    assert torch.equal(rollout["step_count"].squeeze(-1), expected_count - 1)
    assert torch.equal(rollout["next", "truncated"], expected_truncated)
    assert torch.equal(rollout["next", "done"], expected_truncated)
    assert not rollout["next", "terminated"].any()


def test_episode_success_real_env(make: Callable[..., EnvBase]) -> None:
    """``episode_success`` is the running OR of ``success`` since the last reset."""
    env = make(["reach-v3"], goals="fixed", seed=2, max_episode_steps=EPISODE)
    td = env.reset()
    assert not td["episode_success"].any()
    success, episode_success, ever = [], [], False
    for t in range(2 * EPISODE):
        action = scripted_action("reach-v3", td["observation"][0].numpy(), t % EPISODE)
        td["action"] = torch.from_numpy(action)[None]
        td, td_root = env.step_and_maybe_reset(td)
        ever = (ever and t % EPISODE != 0) or bool(td["next", "success"])
        success.append(bool(td["next", "success"]))
        episode_success.append(bool(td["next", "episode_success"]))
        assert episode_success[-1] == ever
        td = td_root
    assert not td["episode_success"].any()  # reset after the last truncation
    first = success[:EPISODE]
    on = first.index(True)
    assert not all(first[on:])  # success turned off again: the OR was really exercised
    assert all(episode_success[on:EPISODE]) and not any(episode_success[EPISODE : EPISODE + on])


def test_episode_success_partial_reset(make: Callable[..., EnvBase]) -> None:
    """A reset of some sub-envs only (``"_reset"``) restarts their episodes and leaves the
    others' ``episode_success``, ``step_count`` and observation as they were."""
    env = make(TASKS, goals="fixed", seed=SEED, max_episode_steps=EPISODE)
    first = env.reset()
    td = first.clone()
    for t in range(AWAY_FROM - 1):  # reach-v3 (sub-env 1) succeeds from step 39, push-v3 not
        actions = [scripted_action(name, o.numpy(), t) for name, o in zip(TASKS, td["observation"])]
        td["action"] = torch.from_numpy(np.stack(actions))
        td = step_mdp(env.step(td))
    steps = AWAY_FROM - 1
    assert td["episode_success"].squeeze(-1).tolist() == [False, True]

    def reset(td: TensorDict, which: int) -> TensorDict:
        before = td.clone()
        td["_reset"] = torch.arange(len(TASKS))[:, None] == which
        after = env.reset(td)
        kept = 1 - which
        for key in ("observation", "episode_success", "step_count", "task_id"):
            assert torch.equal(after[key][kept], before[key][kept]), key
        torch.testing.assert_close(after["observation"][which], first["observation"][which], rtol=0, atol=0)
        assert after["step_count"][which].item() == 0 and not after["episode_success"][which].item()
        return after

    def stay(td: TensorDict) -> TensorDict:
        td["action"] = torch.zeros(len(TASKS), 4)
        return step_mdp(env.step(td))

    td = stay(reset(td, which=0))  # push-v3 restarts; reach-v3's episode goes on, still on its goal
    assert td["step_count"].squeeze(-1).tolist() == [1, steps + 1]
    assert td["success"].squeeze(-1).tolist() == td["episode_success"].squeeze(-1).tolist() == [False, True]
    td = stay(reset(td, which=1))  # reach-v3 restarts, away from its goal: episode_success cleared
    assert td["step_count"].squeeze(-1).tolist() == [2, 1]
    assert not td["episode_success"].any()


def test_episode_success_transform() -> None:
    """Hand-made tensordicts, batch of 2 sub-envs, through the transform's reset/step."""
    transform = EpisodeSuccessTransform()

    def step(td: TensorDict, success: list[bool]) -> TensorDict:
        next_td = TensorDict({"success": torch.tensor(success)[:, None]}, batch_size=[2])
        next_td = transform._step(td, next_td)
        return TensorDict({"episode_success": next_td["episode_success"]}, batch_size=[2])

    td = transform._reset(TensorDict({}, batch_size=[2]), TensorDict({}, batch_size=[2]))
    assert td["episode_success"].shape == (2, 1) and td["episode_success"].dtype == torch.bool
    assert not td["episode_success"].any()
    for success, expected in [
        ([False, False], [False, False]),
        ([True, False], [True, False]),
        ([False, False], [True, False]),  # sticky after success turns off
        ([False, True], [True, True]),
    ]:
        td = step(td, success)
        assert td["episode_success"].squeeze(-1).tolist() == expected
    td["_reset"] = torch.tensor([[False], [True]])
    partial = transform._reset(td, TensorDict({}, batch_size=[2]))
    assert partial["episode_success"].squeeze(-1).tolist() == [True, False]
    td = transform._reset(td.exclude("_reset"), TensorDict({}, batch_size=[2]))
    assert not td["episode_success"].any()


def test_check_env_specs(make: Callable[..., EnvBase]) -> None:
    env = make(["reach-v3", "push-v3"], max_episode_steps=5)
    assert env.batch_size == (2,)
    check_env_specs(env)


def test_parallel_matches_serial(make: Callable[..., EnvBase]) -> None:
    """``execution="parallel"`` (a ``ParallelEnv`` of ``GymWrapper`` s) has the specs and the
    rollouts of the in-process batched env."""
    kwargs = {"benchmark": ["reach-v3", "push-v3"], "max_episode_steps": 5, "reward_scale": 0.1}
    serial, parallel = make(**kwargs), make(**kwargs, execution="parallel")
    assert serial.output_spec == parallel.output_spec and serial.input_spec == parallel.input_spec
    torch.manual_seed(0)
    expected = serial.rollout(7, break_when_any_done=False)  # crosses a truncation
    torch.manual_seed(0)
    assert (parallel.rollout(7, break_when_any_done=False) == expected).all()
    check_env_specs(parallel)


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"benchmark": "MT7"}, ["MT10", "MT50", "reach-v3"]),
        ({"benchmark": ["reach-v3", "reach-v9"]}, ["MT10", "MT50", "reach-v3"]),
        ({"benchmark": []}, ["MT10", "MT50"]),
        ({"goals": "sometimes"}, ["fixed", "random"]),
        ({"max_episode_steps": 0}, ["positive integer"]),
        ({"max_episode_steps": -5}, ["positive integer"]),
        ({"benchmark": ["reach-v3", "push-v3", "reach-v3"]}, ["reach-v3", "once"]),
        ({"execution": "threads"}, ["serial", "parallel"]),
        ({"reward_function_version": "v9"}, ["v1", "v2"]),
        ({"reward_scale": 0.0}, ["positive"]),
    ],
)
def test_bad_input_raises(kwargs: dict, accepted: list[str]) -> None:
    kwargs = {"benchmark": ["reach-v3"], **kwargs}
    with pytest.raises(ValueError) as error:
        make_env(**kwargs)
    for word in accepted:
        assert word in str(error.value)


def test_benchmarks_resolve() -> None:
    mt10 = resolve_tasks("MT10")
    mt50 = resolve_tasks("MT50")
    assert set(mt10) == {
        f"{name}-v3"
        for name in [
            "reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
            "button-press-topdown", "peg-insert-side", "window-open", "window-close",
        ]
    }
    assert len(mt10) == 10 and len(mt50) == len(set(mt50)) == 50
    assert set(mt10) <= set(mt50)
    assert resolve_tasks("reach-v3") == ("reach-v3",)
    assert resolve_tasks(["push-v3", "reach-v3"]) == ("push-v3", "reach-v3")
    assert resolve_tasks("push-v3,reach-v3") == ("push-v3", "reach-v3")
