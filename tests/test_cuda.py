"""The CUDA path: the update on CUDA equals the CPU update, the recipe lands on CUDA with
``device=auto``, and checkpoints move between CUDA and the CPU.

The tests marked ``cuda`` are skipped without a CUDA device (``pytest -m cuda`` selects
them; ``benchmarks/gpu_suite.sh tests`` runs them on a GPU machine). The comparison they
rely on, one update run twice with the same weights, batch and random draws, is checked
here on the CPU against a float64 reference.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded

from d2r_torchrl.data.replay import random_transitions
from d2r_torchrl.modules.actor_critic import ROUTE_KEY
from d2r_torchrl.training import builders, cli
from d2r_torchrl.training.config import apply_overrides, preset, validate
from d2r_torchrl.training.trainer import MultiTaskTrainer
from d2r_torchrl.training.update import sac_update

ROOT = Path(__file__).resolve().parents[1]
OBS, ACT, TASKS, PER_TASK = 39, 4, 10, 8
# Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 a sign, which turns rounding-level
# differences of a gradient near 0 into a whole step. eps = 1e-3 keeps the step a smooth
# function of the gradient, so float tolerance on gradients carries over to the parameters.
ADAM_EPS = 1e-3
TINY = [
    "env.benchmark=reach-v3,push-v3",
    "collector.steps_per_task=10",
    "collector.warmup_rounds=1",
    "collector.updates_per_round=2",
    "collector.total_steps_per_task=30",
    "env.max_episode_steps=10",
    "buffer.kind=stratified",  # needs no compiled torchrl extension, which may not match the torch there
    "buffer.batch_size_per_task=4",
    "buffer.capacity=1000",
    "eval.interval_rounds=3",
    "eval.episodes_per_task=1",
    "log.progress_bar=false",
    "device=auto",
]


def needs_cuda(test):
    """Mark ``test`` as a CUDA test (``pytest -m cuda``), skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


# ---------------------------------------------------------------- same update, two devices
@contextlib.contextmanager
def noise_from_cpu(seed: int) -> Iterator[None]:
    """Draw every random number of an update from one seeded CPU generator in float32, then
    move it to the tensor's device and dtype: the policy's Gaussian noise (``rsample``) and
    the Gumbel noise of sampled routes (``torch.rand_like`` in routing)."""
    generator = torch.Generator().manual_seed(seed)

    def standard_normal(shape, dtype, device) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    def rand_like(tensor: torch.Tensor, **_) -> torch.Tensor:
        return torch.rand(tensor.shape, generator=generator).to(device=tensor.device, dtype=tensor.dtype)

    with mock.patch("torch.distributions.normal._standard_normal", standard_normal), mock.patch(
        "torch.rand_like", rand_like
    ):
        yield


def fixed_batch(actor, seed: int) -> TensorDict:
    """``[TASKS * PER_TASK]`` transitions on the CPU, behaviour routes drawn by ``actor``."""
    with noise_from_cpu(seed):
        return random_transitions(actor, TASKS, TASKS * PER_TASK, OBS, generator=torch.Generator().manual_seed(seed))


def build_update(
    architecture: str, device: torch.device, dtype: torch.dtype, weights: dict | None, overrides: tuple[str, ...]
):
    """Networks, loss, target updater and optimisers of the reference preset with
    ``overrides``, on ``device``/``dtype``, holding ``weights`` (a loss state dict) when given."""
    config = validate(apply_overrides(preset(architecture, "MT10"), list(overrides)))
    spec = Bounded(-1.0, 1.0, (ACT,), device=device)
    actor, critic = builders.make_actor_critic_for(config, OBS, spec, TASKS)
    actor, critic = actor.to(device), critic.to(device)
    loss, updater = builders.make_loss(config, actor, critic, TASKS)
    if weights is not None:
        loss.load_state_dict(weights)
    loss.to(dtype)
    optimizers = builders.make_optimizers(config, loss)
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["eps"] = ADAM_EPS
    return actor, loss, updater, optimizers, config.loss.grad_clip_norm


def run_update(
    architecture: str,
    device: torch.device,
    dtype: torch.dtype,
    weights: dict,
    batch: TensorDict,
    seed: int,
    overrides: tuple[str, ...],
) -> dict:
    """One ``sac_update`` on ``batch``; its losses, ``td_error``, clipped gradients and the
    loss's state afterwards, all on the CPU in float64."""
    _, loss, updater, optimizers, clip = build_update(architecture, device, dtype, weights, overrides)
    batch = batch.apply(lambda x: x.to(dtype) if x.is_floating_point() else x).to(device)
    with noise_from_cpu(seed):
        losses = sac_update(loss, optimizers, updater, batch, clip)
    as64 = lambda x: x.detach().to("cpu", torch.float64)  # noqa: E731
    return {
        "losses": {key: as64(losses[key]) for key in ("loss_actor", "loss_qvalue", "loss_alpha", "alpha", "entropy")},
        "td_error": as64(batch["td_error"]),
        "grads": {name: as64(p.grad) for name, p in loss.named_parameters() if p.grad is not None},
        "state": {name: as64(v) for name, v in loss.state_dict().items() if v.is_floating_point()},
    }


def assert_same_update(got: dict, expected: dict) -> None:
    """Losses to 1e-4 relative; ``td_error``, gradients and parameters elementwise within a
    1e-4 (gradients 1e-3) fraction of each tensor's largest magnitude."""
    for key, value in expected["losses"].items():
        torch.testing.assert_close(got["losses"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for group, rtol in (("grads", 1e-3), ("state", 1e-4)):
        assert got[group].keys() == expected[group].keys()
        for name, value in expected[group].items():
            scale = float(value.abs().max()) if value.numel() else 0.0
            torch.testing.assert_close(got[group][name], value, rtol=rtol, atol=1e-4 * scale + 1e-8, msg=f"{group} {name}")
    scale = float(expected["td_error"].abs().max())
    torch.testing.assert_close(got["td_error"], expected["td_error"], rtol=1e-4, atol=1e-4 * scale)


def reference_weights_and_batch(architecture: str, seed: int, overrides: tuple[str, ...]) -> tuple[dict, TensorDict]:
    torch.manual_seed(seed)
    actor, loss, *_ = build_update(architecture, torch.device("cpu"), torch.float32, None, overrides)
    return {k: v.clone() for k, v in loss.state_dict().items()}, fixed_batch(actor, seed)


@pytest.fixture
def highest_float32_precision() -> Iterator[None]:
    """Full float32 matrix products (no TF32) while a test runs."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def test_update_harness_float32_matches_float64_on_cpu():
    # The harness the CUDA comparison uses: float32 against a float64 reference on the CPU,
    # with different global seeds (all randomness must come from noise_from_cpu); narrower
    # modules than the reference keep it quick.
    network = ("network.module_width=32",)
    weights, batch = reference_weights_and_batch("d2r", 0, network)
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    expected = run_update("d2r", cpu, torch.float64, weights, batch, 7, network)
    torch.manual_seed(2)
    got = run_update("d2r", cpu, torch.float32, weights, batch, 7, network)
    assert_same_update(got, expected)
    other_noise = run_update("d2r", cpu, torch.float32, weights, batch, 8, network)
    with pytest.raises(AssertionError):
        assert_same_update(other_noise, expected)


@pytest.mark.parametrize("architecture", ["d2r", "soft_modular", "mt_sac"])
@pytest.mark.usefixtures("highest_float32_precision")
@needs_cuda
def test_update_on_cuda_equals_update_on_cpu(architecture):
    weights, batch = reference_weights_and_batch(architecture, 0, ())
    expected = run_update(architecture, torch.device("cpu"), torch.float32, weights, batch, 7, ())
    got = run_update(architecture, torch.device("cuda"), torch.float32, weights, batch, 7, ())
    assert_same_update(got, expected)


# Every policy and critic option at once (README, "Policy and critic options").
CRITIC_OPTIONS = (
    "network.log_prob=reference",
    "network.critic_layer_norm=true",
    "network.critic_value_bins=51",
    "loss.clip_td_target=true",
    "loss.reward_normalization=true",
)


@pytest.mark.parametrize("architecture", ["d2r", "mt_sac"])
@pytest.mark.usefixtures("highest_float32_precision")
@needs_cuda
def test_update_with_every_critic_option_on_cuda_equals_update_on_cpu(architecture):
    weights, batch = reference_weights_and_batch(architecture, 0, CRITIC_OPTIONS)
    expected = run_update(architecture, torch.device("cpu"), torch.float32, weights, batch, 7, CRITIC_OPTIONS)
    got = run_update(architecture, torch.device("cuda"), torch.float32, weights, batch, 7, CRITIC_OPTIONS)
    assert_same_update(got, expected)


# ----------------------------------------------------------------------- recipe on CUDA
def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"log.root={run_dir.parent}", f"log.name={run_dir.name}", *extra]


@needs_cuda
def test_recipe_with_device_auto_trains_on_cuda(tmp_path, monkeypatch):
    trainers: list[MultiTaskTrainer] = []

    class RecordedTrainer(MultiTaskTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(cli, "MultiTaskTrainer", RecordedTrainer)
    assert cli.main("d2r", "MT10", tiny_overrides(tmp_path / "run")) == 0
    trainer = trainers[0]
    assert trainer.device.type == "cuda"
    assert all(p.is_cuda for p in trainer.loss.parameters())
    # 3 rounds, the first one warm-up, 2 updates per round
    assert (trainer.counters.rounds, trainer.counters.frames, trainer.counters.updates) == (3, 60, 4)
    routes = trainer.buffer[:][ROUTE_KEY]
    assert routes.shape == (60, 136) and (routes.sum(-1) == 31).all(), "the CUDA actor stores k-hot routes"
    assert torch.isfinite(trainer.loss.log_alpha).all()
    success = (tmp_path / "run" / "scalars" / "eval" / "success_mean.csv").read_text().split()
    assert len(success) == 1 and 0.0 <= float(success[0].split(",")[1]) <= 1.0


# ------------------------------------------------------------ checkpoints across devices
def on_cpu(value: Any) -> Any:
    """``value`` (nested dicts/lists of tensors) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def equal_trees(a: Any, b: Any) -> bool:
    """Same structure and bit-identical tensors (compared on the CPU)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_trees(x, y) for x, y in zip(a, b))
    return a == b


def training_state(trainer: MultiTaskTrainer) -> dict:
    return on_cpu({"loss": trainer.loss.state_dict(), "optimizers": {n: o.state_dict() for n, o in trainer.optimizers.items()}})


def write_interrupted_run(run_dir: str, expected: str) -> dict:
    """Train a tiny run with ``device=auto``, stop it (as on SIGINT) after 2 updates, and
    save its weights and optimiser states to ``expected``."""
    trainer = MultiTaskTrainer(apply_overrides(preset("d2r", "MT10"), tiny_overrides(
        Path(run_dir), "collector.total_steps_per_task=60", "eval.episodes_per_task=0"
    )))
    update = trainer.update

    def update_then_stop() -> TensorDictBase:
        losses = update()
        if trainer.counters.updates == 2:
            trainer._on_signal(signal.SIGINT, None)
        return losses

    trainer.update = update_then_stop
    trainer.train()
    torch.save(training_state(trainer), expected)
    return {"device": trainer.device.type, "interrupted": trainer.interrupted, **trainer.counters.state_dict()}


def resume_and_finish(run_dir: str, expected: str) -> dict:
    """Resume ``run_dir`` on this process's ``device=auto`` device, compare the restored
    state with ``expected`` and train to the end of the budget."""
    trainer = MultiTaskTrainer.resume(run_dir)
    restored = equal_trees(training_state(trainer), torch.load(expected))
    moments = [state["exp_avg"] for o in trainer.optimizers.values() for state in o.state.values()]
    on_device = bool(moments) and all(t.device.type == trainer.device.type for t in [*trainer.loss.parameters(), *moments])
    updates_before = trainer.counters.updates
    trainer.train()
    return {
        "device": trainer.device.type,
        "restored": restored,
        "on_device": on_device,
        "updates_before": updates_before,
        **trainer.counters.state_dict(),
    }


def without_cuda(function: str, *args: str) -> dict:
    """Run ``function(*args)`` of this module in a process that sees no CUDA device."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_cuda; "
        f"print(json.dumps(test_cuda.{function}(*sys.argv[1:])))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@needs_cuda
def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    run_dir, expected = str(tmp_path / "run"), str(tmp_path / "expected.pt")
    written = write_interrupted_run(run_dir, expected)
    assert written == {"device": "cuda", "interrupted": True, "rounds": 2, "frames": 40, "updates": 2}
    resumed = without_cuda("resume_and_finish", run_dir, expected)
    assert resumed["device"] == "cpu" and resumed["restored"] and resumed["on_device"]
    assert resumed["updates_before"] == 2 and resumed["frames"] == 120 and resumed["updates"] > 2


@needs_cuda
def test_checkpoint_written_on_cpu_resumes_on_cuda(tmp_path):
    run_dir, expected = str(tmp_path / "run"), str(tmp_path / "expected.pt")
    written = without_cuda("write_interrupted_run", run_dir, expected)
    assert written == {"device": "cpu", "interrupted": True, "rounds": 2, "frames": 40, "updates": 2}
    resumed = resume_and_finish(run_dir, expected)
    assert resumed["device"] == "cuda" and resumed["restored"] and resumed["on_device"]
    assert resumed["updates_before"] == 2 and resumed["frames"] == 120 and resumed["updates"] > 2
