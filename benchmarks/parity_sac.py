"""Parity: the project's MT-SAC pipeline against a SAC built from stock TorchRL pieces, one task.

    python benchmarks/parity_sac.py --seeds 0 1 2 3 4                 # reach-v3, 50k steps, ~20 min per run and side
    python benchmarks/parity_sac.py --seeds 0 1 2 --set reference     # reward scale 0.1, alpha lr 1e-4
    python benchmarks/parity_sac.py --seeds 0 --steps 5000 --out /tmp/parity_smoke   # smoke and timing
    # the project with two replay settings, then the one against the other:
    python benchmarks/parity_sac.py --sides project --project buffer.kind=stratified_prioritized \
        --out benchmarks/runs/parity/stratified_prioritized_reach-v3
    python benchmarks/parity_sac.py --sides project --project buffer.kind=stratified --out benchmarks/runs/parity/stratified_reach-v3
    python benchmarks/parity_sac.py --compare benchmarks/runs/parity/stratified_prioritized_reach-v3 \
        benchmarks/runs/parity/stratified_reach-v3 --out benchmarks/runs/parity/prioritized_vs_stratified_reach-v3

Both sides train on the same task with random goals (Meta-World's pre-sampled goals of the
task, drawn at every reset), 200-step episodes, MLPs 400-400-400 with the same
initialisation (hidden weights uniform in +-1/sqrt(fan_out), bias 0.1, output layers
uniform in +-3e-3), a TanhNormal policy (scale floored just above 1e-6, the smallest
TorchRL's TanhNormal accepts; runs recorded before 2026-12-07 used a log-std floor of -20), twin critics, batch 128,
rounds of 200 env steps then 200 updates after 20 warm-up rounds collected by the initial
policy, Adam lr 3e-4 (alpha lr per ``--set``), tau 0.005, gamma 0.99, alpha <= 1, the
gradient of each network clipped to norm 1, bootstrapping through time limits.

* project: :class:`~d2r_torchrl.training.trainer.MultiTaskTrainer` with the ``mt_sac`` preset and
  its defaults (replay, loss, extreme-task rule), ``--project KEY=VALUE`` to change them;
* stock: ``torchrl.objectives.SACLoss``, ``torchrl.modules.MLP``/``NormalParamExtractor``/
  ``ProbabilisticActor``/``TanhNormal``/``ValueOperator``, a ``Collector`` over a
  ``GymWrapper`` env and a uniform ``ReplayBuffer``, written here.

Both are evaluated with Meta-World's protocol (:mod:`d2r_torchrl.training.evaluation`)
every ``--eval-every`` frames. Every run checkpoints each evaluation (replay buffer
included); the same command skips finished runs and continues interrupted ones (Ctrl-C
saves). ``summary.md`` gives the IQM success over seeds with 95% stratified-bootstrap
intervals (``rliable``) at each evaluation point and whether the project's interval
overlaps the stock one at every point after 20k steps; ``curves.png`` draws them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import matplotlib
import numpy as np
import torch
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402
from torchrl.collectors import Collector  # noqa: E402
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer  # noqa: E402
from torchrl.envs import Compose, DoubleToFloat, GymWrapper, RewardScaling, TransformedEnv  # noqa: E402
from torchrl.modules import MLP, NormalParamExtractor, ProbabilisticActor, TanhNormal, ValueOperator  # noqa: E402
from torchrl.objectives import SACLoss, SoftUpdate  # noqa: E402

from d2r_torchrl.analysis.aggregate import largest_logged_q  # noqa: E402
from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402
from d2r_torchrl.modules.actor_critic import SCALE_MIN  # noqa: E402
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME  # noqa: E402
from d2r_torchrl.training.config import apply_overrides, preset  # noqa: E402
from d2r_torchrl.training.evaluation import evaluate, make_eval_envs  # noqa: E402
from d2r_torchrl.training.trainer import MultiTaskTrainer  # noqa: E402

SIDES = ("project", "stock")
SETTINGS = {"default": {"reward_scale": 1.0, "alpha_lr": 3e-4}, "reference": {"reward_scale": 0.1, "alpha_lr": 1e-4}}
OVERLAP_AFTER = 20_000
DIVERGED_LOSS = 1e3  # a logged critic loss above this marks a diverging critic (RESULTS 7.7, 11)


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters shared by both sides."""

    task: str
    steps: int
    reward_scale: float
    alpha_lr: float
    eval_every: int
    eval_episodes: int
    hidden: tuple[int, ...] = (400, 400, 400)
    batch_size: int = 128
    steps_per_round: int = 200
    updates_per_round: int = 200
    warmup_rounds: int = 20
    lr: float = 3e-4
    tau: float = 0.005
    gamma: float = 0.99
    episode_steps: int = 200
    grad_clip: float = 1.0

    @property
    def warmup_frames(self) -> int:
        return self.warmup_rounds * self.steps_per_round

    @property
    def capacity(self) -> int:
        return max(self.steps, self.warmup_frames + self.steps_per_round)


# ------------------------------------------------------------------------------ project side
def project_overrides(hyper: Hyper, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    rounds_per_eval = hyper.eval_every // hyper.steps_per_round
    return [
        f"env.benchmark={hyper.task}",
        "env.goals=random",
        f"env.max_episode_steps={hyper.episode_steps}",
        f"env.reward_scale={hyper.reward_scale}",
        f"loss.alpha_lr={hyper.alpha_lr}",
        f"loss.actor_lr={hyper.lr}",
        f"loss.critic_lr={hyper.lr}",
        f"loss.target_update_tau={hyper.tau}",
        f"loss.gamma={hyper.gamma}",
        f"loss.grad_clip_norm={hyper.grad_clip}",
        f"collector.steps_per_task={hyper.steps_per_round}",
        f"collector.updates_per_round={hyper.updates_per_round}",
        f"collector.warmup_rounds={hyper.warmup_rounds}",
        f"collector.total_steps_per_task={hyper.steps}",
        f"buffer.batch_size_per_task={hyper.batch_size}",
        f"buffer.capacity={hyper.capacity}",
        "buffer.in_checkpoint=true",
        f"eval.interval_rounds={rounds_per_eval}",
        f"eval.episodes_per_task={hyper.eval_episodes}",
        f"log.checkpoint_interval_rounds={rounds_per_eval}",
        "log.progress_bar=false",
        "device=cpu",
        *extra,
        f"seed={seed}",
        f"log.root={run_dir.parent}",
        f"log.name={run_dir.name}",
    ]


def run_project(hyper: Hyper, seed: int, run_dir: Path, extra: list[str]) -> bool:
    """Train (or resume) one project run; returns whether it finished."""
    if (run_dir / CHECKPOINT_NAME).exists():
        trainer = MultiTaskTrainer.resume(run_dir)
    else:
        trainer = MultiTaskTrainer(apply_overrides(preset("mt_sac", "MT10"), project_overrides(hyper, seed, run_dir, extra)))
    trainer.train()
    return not trainer.interrupted


def project_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    return read_scalar_csv(run_dir / "scalars" / "eval" / "success_mean.csv")


# -------------------------------------------------------------------------------- stock side
def reference_init_(mlp: nn.Sequential) -> nn.Sequential:
    """Hidden ``Linear`` layers: weights uniform in +-1/sqrt(out_features), bias 0.1; the
    output layer: weights and bias uniform in +-3e-3."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in linears[:-1]:
            bound = 1.0 / math.sqrt(layer.out_features)
            layer.weight.uniform_(-bound, bound)
            layer.bias.fill_(0.1)
        linears[-1].weight.uniform_(-3e-3, 3e-3)
        linears[-1].bias.uniform_(-3e-3, 3e-3)
    return mlp


def stock_env(hyper: Hyper, seed: int) -> TransformedEnv:
    """The task as a ``GymWrapper`` (float32 observations, rewards times ``reward_scale``)."""
    env = gym.make(
        "Meta-World/MT1", env_name=hyper.task, seed=seed, max_episode_steps=hyper.episode_steps, disable_env_checker=True
    )
    return TransformedEnv(GymWrapper(env), Compose(DoubleToFloat(), RewardScaling(loc=0.0, scale=hyper.reward_scale)))


def stock_sac(hyper: Hyper, env: TransformedEnv) -> tuple[ProbabilisticActor, SACLoss]:
    observation_dim = env.observation_spec["observation"].shape[-1]
    action_spec = env.full_action_spec["action"]
    action_dim = action_spec.shape[-1]

    def mlp(in_features: int, out_features: int) -> MLP:
        net = MLP(in_features=in_features, out_features=out_features, num_cells=list(hyper.hidden), activation_class=nn.ReLU)
        return reference_init_(net)

    policy_head = nn.Sequential(mlp(observation_dim, 2 * action_dim), NormalParamExtractor("exp", scale_lb=SCALE_MIN))
    actor = ProbabilisticActor(
        TensorDictModule(policy_head, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=action_spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": action_spec.space.low, "high": action_spec.space.high, "tanh_loc": False},
        return_log_prob=True,
    )
    critic = ValueOperator(mlp(observation_dim + action_dim, 1), in_keys=["observation", "action"])
    loss = SACLoss(actor, critic, num_qvalue_nets=2, loss_function="l2", alpha_init=1.0, max_alpha=1.0)
    loss.make_value_estimator(gamma=hyper.gamma)
    return actor, loss


def clip_each_network_(loss: SACLoss, max_norm: float) -> None:
    """Clip the actor's, each critic's (stacked on dim 0) and alpha's gradient to ``max_norm``."""
    torch.nn.utils.clip_grad_norm_(list(loss.actor_network_params.values(True, True)), max_norm)
    torch.nn.utils.clip_grad_norm_([loss.log_alpha], max_norm)
    grads = [p.grad for p in loss.qvalue_network_params.values(True, True) if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(factor.view(-1, *[1] * (grad.ndim - 1)))


class StockRun:
    """One stock-SAC run with its own checkpoint ``run_dir/state.pt`` (networks, optimisers,
    replay buffer, counters, evaluations, critic losses). ``critic_losses`` holds one row per
    round of updates, ``[frames, mean, max]`` of ``loss_qvalue`` over its updates (the
    project's critic loss is the same quantity: ``sum_k (Q_k - y)^2`` averaged over the
    batch); each save also writes them to ``run_dir/critic_loss.csv``."""

    def __init__(self, hyper: Hyper, seed: int, run_dir: Path) -> None:
        self.hyper, self.seed, self.run_dir = hyper, seed, run_dir
        torch.manual_seed(seed)
        self.actor, self.loss = stock_sac(hyper, stock_env(hyper, seed))
        self.target_updater = SoftUpdate(self.loss, tau=hyper.tau)
        self.optimizers = {
            "actor": torch.optim.Adam(self.loss.actor_network_params.values(True, True), lr=hyper.lr),
            "critic": torch.optim.Adam(self.loss.qvalue_network_params.values(True, True), lr=hyper.lr),
            "alpha": torch.optim.Adam([self.loss.log_alpha], lr=hyper.alpha_lr),
        }
        self.buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(hyper.capacity), batch_size=hyper.batch_size)
        self.frames, self.updates, self.evals, self.critic_losses = 0, 0, [], []
        self.eval_envs = make_eval_envs([hyper.task], goals="random", seed=seed, max_episode_steps=hyper.episode_steps)
        if (run_dir / "state.pt").exists():
            self.load()

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "buffer": self.buffer.state_dict(),
            "counters": {"frames": self.frames, "updates": self.updates},
            "evals": self.evals,
            "critic_losses": self.critic_losses,
            "rng": torch.get_rng_state(),
        }

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        partial = self.run_dir / "state.pt.partial"
        torch.save(self.state_dict(), partial)
        os.replace(partial, self.run_dir / "state.pt")
        rows = "".join(f"{frames},{mean},{largest}\n" for frames, mean, largest in self.critic_losses)
        (self.run_dir / "critic_loss.csv").write_text("frames,mean,max\n" + rows)

    def load(self) -> None:
        state = torch.load(self.run_dir / "state.pt", weights_only=False)
        self.loss.load_state_dict(state["loss"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.buffer.load_state_dict(state["buffer"])
        self.frames, self.updates = state["counters"]["frames"], state["counters"]["updates"]
        self.evals = state["evals"]
        self.critic_losses = state.get("critic_losses", [])  # absent from runs saved before it was logged
        torch.set_rng_state(state["rng"])

    def update(self) -> float:
        """One update; returns its critic loss."""
        losses = self.loss(self.buffer.sample())
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        (losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_alpha"]).backward()
        clip_each_network_(self.loss, self.hyper.grad_clip)
        for opt in self.optimizers.values():
            opt.step()
        self.target_updater.step()
        self.updates += 1
        return float(losses["loss_qvalue"].detach())

    def evaluate(self) -> None:
        self.actor.eval()
        result = evaluate(self.actor, self.eval_envs, [self.hyper.task], self.hyper.eval_episodes)
        self.actor.train()
        self.evals.append([self.frames, float(result.success.mean())])

    def train(self) -> bool:
        """Collect, update and evaluate until ``steps`` frames; Ctrl-C saves and returns False."""
        hyper = self.hyper
        # a resumed run does not replay the goal draws of its first rounds
        env = stock_env(hyper, self.seed + self.frames // hyper.steps_per_round)
        collector = Collector(
            env,
            self.actor,
            frames_per_batch=hyper.steps_per_round,
            total_frames=hyper.steps - self.frames,
            auto_register_policy_transforms=False,
        )
        try:
            for data in collector:
                self.buffer.extend(data.reshape(-1))
                self.frames += data.numel()
                if len(self.buffer) > hyper.warmup_frames:
                    critic = [self.update() for _ in range(hyper.updates_per_round)]
                    self.critic_losses.append([self.frames, sum(critic) / len(critic), max(critic)])
                if self.frames % hyper.eval_every == 0:
                    self.evaluate()
                    self.save()
        except KeyboardInterrupt:
            self.save()
            return False
        finally:
            collector.shutdown()
        self.save()
        return True


# ---------------------------------------------------------------------------------- driver
def run_all(out: Path, hyper: Hyper, seeds: list[int], sides: list[str], extra: list[str]) -> None:
    """Train every (side, seed) not finished yet; ``benchmark.json`` records whether it
    finished, its wall and CPU seconds (summed over resumed segments, set-up included)."""
    for seed in seeds:  # seed-major: an unfinished benchmark still has paired seeds
        for side in sides:
            run_dir = out / f"{side}_seed{seed}"
            record = run_dir / "benchmark.json"
            state = {"done": False, "seconds": 0.0, "cpu_seconds": 0.0}
            state.update(json.loads(record.read_text()) if record.exists() else {})
            if state["done"]:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            finished = run_project(hyper, seed, run_dir, extra) if side == "project" else StockRun(hyper, seed, run_dir).train()
            state.update(
                done=finished,
                seconds=state["seconds"] + time.perf_counter() - wall,
                cpu_seconds=state["cpu_seconds"] + time.process_time() - cpu,
            )
            run_dir.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(state, indent=2))
            if not finished:
                raise SystemExit(f"Interrupted: {run_dir} is saved; the same command continues it.")


def success_matrix(runs: Path, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(frames [P], success [runs, P])`` of the runs ``<runs>_seed<seed>`` (a project or
    stock side) over the evaluation points every run reached."""
    curves = []
    for seed in seeds:
        run_dir = runs.parent / f"{runs.name}_seed{seed}"
        if (run_dir / "state.pt").exists():  # stock side
            evals = torch.load(run_dir / "state.pt", weights_only=False)["evals"]
            curves.append(([f for f, _ in evals], [s for _, s in evals]))
        else:
            curves.append(project_curve(run_dir))
    points = min(len(frames) for frames, _ in curves)
    return np.asarray(curves[0][0][:points]), np.asarray([values[:points] for _, values in curves])


def iqm_with_intervals(scores: np.ndarray, reps: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """IQM over runs at each point and its 95% stratified-bootstrap interval, with rliable:
    ``scores`` ``[runs, P]`` -> ``(iqm [P], interval [2, P])``."""

    def iqm_per_point(values: np.ndarray) -> np.ndarray:  # [runs, tasks=1, P]
        return np.array([metrics.aggregate_iqm(values[..., p]) for p in range(values.shape[-1])])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arch deprecates RandomState, which rliable passes on
        point, interval = rly.get_interval_estimates(
            {"runs": scores[:, None, :]}, iqm_per_point, reps=reps, random_state=np.random.RandomState(0)
        )
    return point["runs"], interval["runs"]


def summarise(out: Path, sources: dict[str, Path], seeds: list[int], title: str) -> dict:
    """IQM success with 95% intervals of two sources (label -> runs ``<path>_seed<seed>``) at
    every evaluation point, whether their intervals overlap, and per run its wall and CPU
    seconds, final success and largest logged critic loss (project runs); writes
    ``summary.json``, ``summary.md`` and ``curves.png`` to ``out``."""
    curves = {label: success_matrix(runs, seeds) for label, runs in sources.items()}
    points = min(len(frames) for frames, _ in curves.values())
    frames = next(iter(curves.values()))[0][:points]
    stats = {label: iqm_with_intervals(success[:, :points]) for label, (_, success) in curves.items()}
    (a_lo, a_hi), (b_lo, b_hi) = (interval for _, interval in stats.values())
    overlap = np.maximum(a_lo, b_lo) <= np.minimum(a_hi, b_hi)
    late = frames > OVERLAP_AFTER
    per_run = {label: [_run_facts(runs.parent / f"{runs.name}_seed{s}") for s in seeds] for label, runs in sources.items()}
    summary = {
        "frames": frames.tolist(),
        **{label: {"iqm": stats[label][0].tolist(), "ci95": stats[label][1].tolist()} for label in sources},
        "overlap": overlap.tolist(),
        "overlap_after_20k": bool(overlap[late].all()) if late.any() else None,
        "runs": per_run,
    }
    _plot(out / "curves.png", frames, stats, title)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_table(summary, list(sources), seeds, title))
    return summary


def _run_facts(run_dir: Path) -> dict:
    """Wall and CPU seconds (``benchmark.json``), final success and the largest critic loss
    it logged (a diverging critic shows there first): for a project run the last update's of
    each round, for a stock run the largest single update's (none before it was logged)."""
    record = json.loads((run_dir / "benchmark.json").read_text())
    facts = {"wall_seconds": record["seconds"], "cpu_seconds": record["cpu_seconds"]}
    if (run_dir / "state.pt").exists():
        state = torch.load(run_dir / "state.pt", weights_only=False)
        facts["final_success"] = state["evals"][-1][1]
        if state.get("critic_losses"):
            facts["max_critic_loss"] = max(largest for _, _, largest in state["critic_losses"])
    critic = run_dir / "scalars" / "train" / "loss_qvalue.csv"
    if critic.exists():
        facts["max_critic_loss"] = max(read_scalar_csv(critic)[1])
        facts["final_success"] = project_curve(run_dir)[1][-1]
    return facts


def option_table(folders: list[Path], seeds: list[int]) -> str:
    """Markdown, one row per finished project run ``<folder>/project_seed<seed>``: its success
    at every evaluation, the largest critic loss it logged (the last update's of each round,
    in the loss's own units), the first step and the number of rounds at which that loss
    exceeds :data:`DIVERGED_LOSS`, and the largest ``|Q|`` it logged (``train/q_max``, in the
    units of the TD target; ``-`` for runs without that log)."""
    rows, frames = [], None
    for folder in folders:
        for seed in seeds:
            run_dir = folder / f"project_seed{seed}"
            record = run_dir / "benchmark.json"
            if not record.exists() or not json.loads(record.read_text())["done"]:
                continue
            frames, success = project_curve(run_dir)
            steps, losses = read_scalar_csv(run_dir / "scalars" / "train" / "loss_qvalue.csv")
            above = [step for step, loss in zip(steps, losses) if loss > DIVERGED_LOSS]
            first = f"{above[0]:,.0f}" if above else "-"
            cells = " | ".join(f"{value:.2f}" for value in success)
            q = largest_logged_q(run_dir)
            q_cell = "-" if q is None else f"{q:.3g}"
            rows.append(f"| {folder.name} | {seed} | {cells} | {max(losses):.3g} | {first} | {len(above)} | {q_cell} |")
    if frames is None:
        return "No finished project run in " + ", ".join(map(str, folders)) + "\n"
    head = " | ".join(f"{frame / 1000:g}k" for frame in frames)
    return "\n".join([
        f"| run | seed | success at {head} | largest critic loss | first step > {DIVERGED_LOSS:g} | rounds > {DIVERGED_LOSS:g} "
        "| largest abs Q |",
        "|---|---|" + "---|" * len(frames) + "---|---|---|---|",
        *rows,
    ]) + "\n"


def _plot(path: Path, frames: np.ndarray, stats: dict, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (iqm, (low, high)) in stats.items():
        (line,) = ax.plot(frames, iqm, marker="o", label=label)
        ax.fill_between(frames, low, high, color=line.get_color(), alpha=0.2)
    ax.axvline(OVERLAP_AFTER, color="grey", linestyle=":")
    ax.set(xlabel="env steps", ylabel="IQM success (95% CI)", ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(summary: dict, labels: list[str], seeds: list[int], title: str) -> str:
    def cell(label: str, i: int) -> str:
        low, high = summary[label]["ci95"][0][i], summary[label]["ci95"][1][i]
        return f"{summary[label]['iqm'][i]:.2f} [{low:.2f}, {high:.2f}]"

    def facts(label: str, key: str, spec: str) -> str:
        return ", ".join(format(run[key], spec) for run in summary["runs"][label] if key in run)

    first, second = labels
    lines = [
        f"{title}; seeds {seeds}; IQM success over seeds [95% bootstrap CI]",
        "",
        f"| env steps | {first} | {second} | intervals overlap |",
        "|---|---|---|---|",
        *[
            f"| {frames:,.0f} | {cell(first, i)} | {cell(second, i)} | {'yes' if summary['overlap'][i] else 'NO'} |"
            for i, frames in enumerate(summary["frames"])
        ],
        "",
        f"The intervals overlap at every point after {OVERLAP_AFTER:,} steps: {summary['overlap_after_20k']}",
        "",
        *[
            f"{name} per run: " + "; ".join(f"{label} {facts(label, key, spec)}" for label in labels)
            for name, key, spec in (
                ("Final success", "final_success", ".2f"),
                ("Largest critic loss", "max_critic_loss", ".3g"),
                ("Wall seconds", "wall_seconds", ".0f"),
                ("CPU seconds", "cpu_seconds", ".0f"),
            )
        ],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--set", dest="setting", choices=list(SETTINGS), default="default",
                        help="default: reward scale 1, alpha lr 3e-4; reference: reward scale 0.1, alpha lr 1e-4")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--eval-every", type=int, default=5_000, help="env steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=50, help="episodes per evaluation (Meta-World's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--project", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides of the project side, e.g. --project buffer.kind=stratified")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/out/parity/<set>_<task>")
    parser.add_argument("--compare", type=Path, nargs=2, metavar="OUT", default=None,
                        help="train nothing: summarise the project sides of two --out folders against each other in --out")
    parser.add_argument("--table", type=Path, nargs="+", metavar="OUT", default=None,
                        help="train nothing: print one row per finished project run of these --out folders "
                             "(success per evaluation, critic loss) and write it to --out/table.md if --out is given")
    args = parser.parse_args()
    title = f"{args.task}, {args.setting} settings, {args.steps:,} steps"
    if args.table:
        table = option_table(args.table, args.seeds)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "table.md").write_text(table)
        print(table)
        return
    if args.compare:
        args.out.mkdir(parents=True, exist_ok=True)
        summarise(args.out, {path.name: path / "project" for path in args.compare}, args.seeds, title)
        print((args.out / "summary.md").read_text())
        return
    if args.eval_every % 200 or args.steps % args.eval_every:
        parser.error("--eval-every must be a multiple of the 200-step round and divide --steps.")
    torch.set_num_threads(args.threads)
    hyper = Hyper(args.task, args.steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes, **SETTINGS[args.setting])
    out = args.out or Path("benchmarks/out/parity") / f"{args.setting}_{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    run_all(out, hyper, args.seeds, args.sides, args.project)
    if set(args.sides) == set(SIDES):
        summarise(out, {side: out / side for side in SIDES}, args.seeds, title)
        print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
