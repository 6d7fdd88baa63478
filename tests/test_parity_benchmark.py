"""The parity benchmark's statistics, the stock side's checkpoint/resume and the project side's config."""
from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrl.modules import TanhNormal

from d2r_torchrl.training.config import apply_overrides, preset, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("parity_sac", ROOT / "benchmarks" / "parity_sac.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_hyper(parity, steps: int):
    """Rounds of 20 steps, 2 updates each after 1 warm-up round, an evaluation every 40 steps."""
    hyper = parity.Hyper("reach-v3", steps, reward_scale=1.0, alpha_lr=3e-4, eval_every=40, eval_episodes=1)
    return replace(
        hyper, hidden=(16,), batch_size=8, steps_per_round=20, updates_per_round=2, warmup_rounds=1, episode_steps=20
    )


def test_iqm_and_interval_from_rliable(parity) -> None:
    # IQM of 5 runs drops the lowest and the highest run: mean(0.2, 0.4, 0.6) = 0.4
    scores = np.array([[0.0, 0.5], [0.2, 0.5], [0.4, 0.5], [0.6, 0.5], [1.0, 0.5]])
    iqm, interval = parity.iqm_with_intervals(scores, reps=500)
    np.testing.assert_allclose(iqm, [0.4, 0.5])
    assert interval.shape == (2, 2)
    assert interval[0, 0] < 0.4 < interval[1, 0] and 0.0 <= interval[0, 0] and interval[1, 0] <= 1.0
    np.testing.assert_allclose(interval[:, 1], [0.5, 0.5])  # identical runs: no spread


def test_stock_run_checkpoints_and_continues(parity, tmp_path: Path) -> None:
    """A run interrupted (Ctrl-C) during its evaluation at step 80 saves; a new run on the
    same directory continues from there to 120: counters, replay buffer and evaluations
    carry over."""
    hyper = tiny_hyper(parity, 120)
    first = parity.StockRun(hyper, seed=0, run_dir=tmp_path)
    evaluate, update, critic_losses = first.evaluate, first.update, []

    def recorded_update() -> float:
        critic_losses.append(update())
        return critic_losses[-1]

    def evaluate_then_interrupt() -> None:
        evaluate()
        if first.frames == 80:
            raise KeyboardInterrupt

    first.evaluate, first.update = evaluate_then_interrupt, recorded_update
    assert not first.train()
    pairs = [critic_losses[i : i + 2] for i in (0, 2, 4)]  # rounds at 40, 60, 80: 2 updates each
    assert first.critic_losses == [[f, sum(p) / 2, max(p)] for f, p in zip((40, 60, 80), pairs)]
    resumed = parity.StockRun(hyper, seed=0, run_dir=tmp_path)
    assert (resumed.frames, resumed.updates, len(resumed.buffer)) == (80, 6, 80)  # rounds 2-4 updated
    assert [frames for frames, _ in resumed.evals] == [40, 80]
    assert resumed.train()
    assert (resumed.frames, resumed.updates, len(resumed.buffer)) == (120, 10, 120)
    assert [frames for frames, _ in resumed.evals] == [40, 80, 120]
    assert all(0.0 <= success <= 1.0 for _, success in resumed.evals)
    # one critic-loss row per round of updates, carried over the interruption
    assert [frames for frames, _, _ in resumed.critic_losses] == [40, 60, 80, 100, 120]
    assert all(0.0 <= mean <= largest and math.isfinite(largest) for _, mean, largest in resumed.critic_losses)
    written = (tmp_path / "critic_loss.csv").read_text().splitlines()
    assert written[0] == "frames,mean,max" and [float(v) for v in written[-1].split(",")] == resumed.critic_losses[-1]


def test_diagnosis_log_probabilities_exact_and_bounded() -> None:
    spec = importlib.util.spec_from_file_location("diagnose_divergence", ROOT / "benchmarks" / "diagnose_divergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # exact: TorchRL's TanhNormal scoring the same pre-tanh value
    loc, scale = torch.tensor([[0.5, -2.0, 9.0, 0.0]], dtype=torch.float64), torch.tensor([[0.3, 1.0, 0.05, 2.0]], dtype=torch.float64)
    dist = TanhNormal(loc, scale)
    torch.manual_seed(0)
    action, log_prob = dist.rsample_and_log_prob()
    torch.manual_seed(0)
    z = dist.base_dist.rsample()
    exact, _ = module.tanh_log_probs(z, dist.base_dist.log_prob(z))
    torch.testing.assert_close(exact, log_prob)
    # by hand at z = 10 in each of 4 dimensions (log N(z) = 0): log pi = -sum log(1 - tanh(z)^2 (+ 1e-6)),
    # with 1 - tanh(10)^2 = sech(10)^2 = 4 e^-20 (1 + e^-20)^-2: exact 20 - log 4 + O(1e-8) per dimension,
    # bounded -log(4 e^-20 + 1e-6)
    z = torch.full((1, 4), 10.0, dtype=torch.float64)
    exact, bounded = module.tanh_log_probs(z, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(exact, torch.tensor([4 * (20 - math.log(4))], dtype=torch.float64))
    torch.testing.assert_close(bounded, torch.tensor([-4 * math.log(4 * math.exp(-20) + 1e-6)], dtype=torch.float64))
    assert abs(float(exact) / 4 - 18.614) < 1e-3 and abs(float(bounded) / 4 - 13.807) < 1e-3


def test_project_side_runs_the_preset_with_the_shared_hyper_parameters(parity, tmp_path: Path) -> None:
    hyper = parity.Hyper("reach-v3", 50_000, eval_every=5_000, eval_episodes=50, **parity.SETTINGS["reference"])
    config = validate(apply_overrides(preset("mt_sac", "MT10"), parity.project_overrides(hyper, 3, tmp_path / "run", [])))
    assert (config.env.benchmark, config.env.goals, config.env.reward_scale) == ("reach-v3", "random", 0.1)
    assert (config.loss.alpha_lr, config.loss.actor_lr, config.buffer.batch_size_per_task) == (1e-4, 3e-4, 128)
    assert (config.collector.warmup_rounds, config.eval.interval_rounds, config.seed) == (20, 25, 3)
    assert config.network.architecture == "mt_sac" and not config.loss.loss_balancing
