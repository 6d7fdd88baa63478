"""Test-wide settings: one torch thread per process (the tests run small networks, and
subprocesses and Ray workers share the machine's cores), and Meta-World's goal sampling
done once per task and seed in a test process."""
import metaworld
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def goals_sampled_once_per_task_and_seed():
    """Every Meta-World env creation samples its task's 50 goals by resetting a fresh env 50
    times (about 1 s per task on a small CPU). With a seed, that sampling
    (``metaworld._make_tasks``) depends on its arguments only, so the session keeps each
    result and hands out copies; unseeded calls sample as usual."""
    sample = metaworld._make_tasks
    sampled: dict[tuple, list] = {}

    def sample_once(classes, args_kwargs, kwargs_override, seed=None):
        if seed is None:
            return sample(classes, args_kwargs, kwargs_override, seed)
        key = (tuple(classes[name] for name in args_kwargs), repr(args_kwargs), repr(kwargs_override), seed)
        if key not in sampled:
            sampled[key] = sample(classes, args_kwargs, kwargs_override, seed)
        return list(sampled[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metaworld, "_make_tasks", sample_once)
        yield
