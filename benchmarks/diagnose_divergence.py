"""Where a diverging critic's TD errors start: the TD target of every stored transition of a
checkpoint of a one-task project MT-SAC run, term by term, and the stored data against
Meta-World.

    python benchmarks/critic_divergence.py --seed 0 --steps 28000 --snapshots \\
        --out benchmarks/out/divergence/project_seed0          # keeps every checkpoint
    python benchmarks/diagnose_divergence.py benchmarks/out/divergence/project_seed0 \\
        --frames 4000 20000 22000 --out benchmarks/runs/divergence/project_seed0

For each checkpoint ``RUN/snapshots/<frames>/checkpoint`` (``--frames``; default: all):

* every stored transition ``(s, a, r, s', terminated, truncated)``: ``Q_1, Q_2(s, a)``, and
  the target ``y = r + gamma (1 - terminated) (min_k Qbar_k(s', a') - alpha log pi(a'|s'))``
  split into ``r``, ``gamma min Qbar``, ``-gamma alpha log pi`` and the bootstrap flag,
  averaged over ``--draws`` draws of ``a' ~ pi(.|s')``; ``log pi`` both as TorchRL's
  ``TanhNormal`` computes it (exact tanh correction) and in the bounded form
  ``log N(z) - sum log(1 - tanh(z)^2 + 1e-6)``; ``|Q - y|`` of the larger critic;
* the transitions whose ``|Q - y|`` exceeds ``--bound`` (default: the largest discounted
  return, ``r_max / (1 - gamma)`` = 1,000 at reward scale 1), or the ``--top`` largest:
  episode and step, every term, the pre-tanh values ``z`` of the stored action and of
  ``a'``, the policy's ``loc``/``scale`` at ``s'``, how far ``s`` and ``s'`` lie from the
  buffer's observations (largest per-feature z-score);
* the data: ``s'_t == s_{t+1}`` inside every episode, ``s'`` at the time limit differs
  from the next episode's first ``s``, ``truncated`` exactly at the last step,
  ``terminated`` never; and the first ``--replay-episodes`` episodes stepped again through
  the run's own env (same seed, the stored actions): largest difference of observation,
  next observation and reward, and of the flags.

Writes ``OUT/diagnosis.json`` and ``OUT/diagnosis.md``. One torch thread.

    python benchmarks/diagnose_divergence.py --warmup-seeds 0 1 2 3 4 --out benchmarks/runs/divergence/warmup

collects only the warm-up (20 rounds of 200 steps by the initial policy, as in
``benchmarks/parity_sac.py``) of each side and seed and writes ``OUT/warmup.json``: per
episode the largest z-score of an ``s'`` feature against that buffer, and which episodes
and steps exceed 10.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import metaworld  # noqa: F401  (registers the Meta-World gymnasium ids)
import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from d2r_torchrl.training.builders import env_factory
from d2r_torchrl.training.config import apply_overrides, preset
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME
from d2r_torchrl.training.trainer import MultiTaskTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_sac import SETTINGS, Hyper, StockRun, project_overrides  # noqa: E402

REWARD_MAX = 10.0  # Meta-World's per-step reward is in [0, 10]
RLKIT_EPS = 1e-6


def load_snapshot(run_dir: Path, frames: int, scratch: Path) -> MultiTaskTrainer:
    """The trainer of ``run_dir`` at its snapshot ``frames`` (resumed in ``scratch``)."""
    target = scratch / str(frames)
    target.mkdir(parents=True)
    shutil.copy(run_dir / "config.json", target / "config.json")
    shutil.copy(run_dir / "snapshots" / str(frames) / CHECKPOINT_NAME, target / CHECKPOINT_NAME)
    return MultiTaskTrainer.resume(target)


def stored_transitions(trainer: MultiTaskTrainer) -> TensorDictBase:
    """Every stored transition in collection order (one task: position = frame)."""
    if trainer.num_tasks != 1:
        raise ValueError(f"The diagnosis reads one-task runs; this run has {trainer.num_tasks} tasks.")
    return trainer.buffer[: len(trainer.buffer)]


def tanh_log_probs(z: torch.Tensor, base_log_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi`` of ``tanh(z)`` ``[..., A]`` from ``log N(z)`` ``[...]``: ``(exact, bounded)``,
    exact = ``log N(z) - sum 2 (log 2 - z - softplus(-2z))`` (TorchRL's ``TanhNormal``),
    bounded = ``log N(z) - sum log(1 - tanh(z)^2 + 1e-6)``."""
    exact = base_log_prob - (2 * (math.log(2) - z - torch.nn.functional.softplus(-2 * z))).sum(-1)
    bounded = base_log_prob - torch.log(1 - torch.tanh(z).pow(2) + RLKIT_EPS).sum(-1)
    return exact, bounded


@torch.no_grad()
def policy_at(trainer: MultiTaskTrainer, observations: TensorDictBase):
    """The policy's ``TanhNormal`` at ``observations`` (the loss's actor parameters)."""
    loss = trainer.loss
    with set_exploration_type(ExplorationType.RANDOM), loss.actor_network_params.to_module(loss.actor_network):
        return loss.actor_network.get_dist(observations.select(*loss.actor_network.in_keys).copy())


@torch.no_grad()
def critics(trainer: MultiTaskTrainer, observations: TensorDictBase, action: torch.Tensor, target: bool) -> torch.Tensor:
    """``Q_k(s, a)`` ``[2, B]`` of the critics or (``target``) the target critics."""
    loss = trainer.loss
    td = observations.select(*[k for k in loss.qvalue_network.in_keys if k != "action"]).copy()
    td.set("action", action)
    params = loss.target_qvalue_network_params if target else loss.qvalue_network_params
    return loss._critics(td, params).get("state_action_value").squeeze(-1)


@torch.no_grad()
def td_terms(trainer: MultiTaskTrainer, data: TensorDictBase, draws: int, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """Every term of the TD target per stored transition (see the module docstring), ``[N]``
    each (``z_next_abs_max``: the largest ``|z'|`` over draws and action dimensions)."""
    loss = trainer.loss
    gamma = float(loss.value_estimator.gamma)
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, data.shape[0], chunk):
        td = data[start : start + chunk]
        next_td = td.get("next")
        q = critics(trainer, td, td.get("action"), target=False)
        dist = policy_at(trainer, next_td)
        z = dist.base_dist.rsample((draws,))  # [D, B, A]
        action = dist.transforms[0](z)
        exact, bounded = tanh_log_probs(z, dist.base_dist.log_prob(z))
        task = td.get("task_id").reshape(-1)
        alpha = loss._alpha[task]
        q_next = torch.stack([critics(trainer, next_td, a, target=True).min(0).values for a in action])
        bootstrap = 1.0 - next_td.get("terminated").reshape(-1).float()
        reward = next_td.get("reward").reshape(-1)
        bootstrap_value = gamma * bootstrap * q_next.mean(0)
        entropy_term = -gamma * bootstrap * alpha * exact.mean(0)
        target = reward + bootstrap_value + entropy_term
        stored_z = torch.atanh(td.get("action").clamp(-1 + 1e-7, 1 - 1e-7))
        policy_here = policy_at(trainer, td)
        rows = {
            "q1": q[0], "q2": q[1], "reward": reward, "gamma_min_qbar": bootstrap_value,
            "minus_gamma_alpha_logpi": entropy_term,
            "minus_gamma_alpha_logpi_bounded": -gamma * bootstrap * alpha * bounded.mean(0),
            "bootstrap": bootstrap, "terminated": next_td.get("terminated").reshape(-1).float(),
            "truncated": next_td.get("truncated").reshape(-1).float(), "target": target,
            "td_error": (q - target).abs().max(0).values,
            "logpi_next_exact": exact.mean(0), "logpi_next_bounded": bounded.mean(0),
            "logpi_next_exact_max": exact.max(0).values,
            "z_next_abs_max": z.abs().amax((0, 2)), "loc_next_abs_max": dist.loc.abs().amax(-1),
            "scale_next_min": dist.scale.amin(-1), "alpha": alpha,
            "z_stored_abs_max": stored_z.abs().amax(-1),
            "action_saturated": (td.get("action").abs() > 0.999).any(-1).float(),
            "loc_here_abs_max": policy_here.loc.abs().amax(-1), "scale_here_min": policy_here.scale.amin(-1),
        }
        for key, value in rows.items():
            out.setdefault(key, []).append(value.float())
    return {key: torch.cat(values) for key, values in out.items()}


def feature_zscores(data: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest per-feature z-score (against all stored ``s``) of every ``s`` and ``s'``, and
    the feature of ``s'`` where it is, ``[N]`` each."""
    obs = data.get("observation")
    mean, std = obs.mean(0), obs.std(0).clamp(min=1e-6)
    next_z = ((data.get(("next", "observation")) - mean) / std).abs()
    return ((obs - mean) / std).abs().amax(-1), next_z.amax(-1), next_z.argmax(-1)


def unusual_by_block(zs: tuple[torch.Tensor, ...], threshold: float, block: int) -> list[list[float]]:
    """Per ``block`` stored transitions (collection order): ``[first frame, share of s' with a
    feature more than ``threshold`` standard deviations from the buffer's mean]``."""
    unusual = (zs[1] > threshold).float()
    return [[start, round(float(unusual[start : start + block].mean()), 4)] for start in range(0, unusual.numel(), block)]


def data_checks(data: TensorDictBase, episode_steps: int) -> dict:
    """Continuity of ``s'`` and ``s`` inside episodes, the time-limit boundary and the flags."""
    obs, next_obs = data.get("observation"), data.get(("next", "observation"))
    n = obs.shape[0] - obs.shape[0] % episode_steps
    step = torch.arange(obs.shape[0]) % episode_steps
    inside = (step[: n - 1] != episode_steps - 1)
    gap = (next_obs[: n - 1] - obs[1:n]).abs().amax(-1)
    truncated = data.get(("next", "truncated")).reshape(-1)
    return {
        "episodes": n // episode_steps,
        "inside_episode_max_abs_next_obs_minus_following_obs": float(gap[inside].max()),
        "boundary_min_abs_next_obs_minus_reset_obs": float(gap[~inside].min()) if (~inside).any() else None,
        "truncated_exactly_at_last_step": bool((truncated == (step == episode_steps - 1)).all()),
        "terminated_count": int(data.get(("next", "terminated")).sum()),
        "done_equals_truncated_or_terminated": bool(
            (data.get(("next", "done")) == (data.get(("next", "truncated")) | data.get(("next", "terminated")))).all()
        ),
    }


@torch.no_grad()
def replay_env(trainer: MultiTaskTrainer, data: TensorDictBase, episodes: int) -> dict:
    """Step the run's training env again (same seed, as the collector built it) with the
    stored actions of the first ``episodes`` episodes; largest differences to what was stored."""
    config = trainer.config
    steps = episodes * config.env.max_episode_steps
    env = env_factory(config, trainer.tasks)()
    td = env.reset()
    diffs = {"observation": 0.0, "next_observation": 0.0, "reward": 0.0, "flags_mismatch": 0}
    boundary = []
    for t in range(steps):
        stored = data[t]
        diffs["observation"] = max(diffs["observation"], float((td.get("observation")[0] - stored.get("observation")).abs().max()))
        td.set("action", stored.get("action").unsqueeze(0))
        td, td_root = env.step_and_maybe_reset(td)
        nxt = td.get("next")
        diffs["next_observation"] = max(
            diffs["next_observation"], float((nxt.get("observation")[0] - stored.get(("next", "observation"))).abs().max())
        )
        diffs["reward"] = max(diffs["reward"], float((nxt.get("reward")[0] - stored.get(("next", "reward"))).abs().max()))
        for flag in ("terminated", "truncated", "done"):
            diffs["flags_mismatch"] += int(bool(nxt.get(flag)[0] != stored.get(("next", flag))))
        if bool(nxt.get("done")[0]):
            boundary.append({
                "step": t,
                "next_obs_returned_minus_stored": float((nxt.get("observation")[0] - stored.get(("next", "observation"))).abs().max()),
                "next_obs_minus_reset_obs": float((nxt.get("observation")[0] - td_root.get("observation")[0]).abs().max()),
            })
        td = td_root
    env.close()
    return {"steps": steps, "max_abs_difference": diffs, "boundaries": boundary}


def replay_gymnasium(trainer: MultiTaskTrainer, data: TensorDictBase, episodes: int) -> dict:
    """The same check straight on Meta-World's gymnasium env (``gym.make("Meta-World/MT1")``
    with the run's seed, seeded once and reset as the collector does, no TorchRL in between):
    largest differences of observation, next observation (the one ``step`` returned, at the
    time limit included) and reward, and how many ``terminated``/``truncated`` differ."""
    config = trainer.config
    env = gym.make("Meta-World/MT1", env_name=trainer.tasks[0], seed=config.seed,
                   max_episode_steps=config.env.max_episode_steps,
                   reward_function_version=config.env.reward_function_version, disable_env_checker=True)
    env.reset(seed=config.seed)
    obs, _ = env.reset()
    diffs = {"observation": 0.0, "next_observation": 0.0, "reward": 0.0, "flags_mismatch": 0}
    scale = config.env.reward_scale
    for t in range(episodes * config.env.max_episode_steps):
        stored = data[t]
        diffs["observation"] = max(diffs["observation"], float(abs(obs - stored.get("observation").double().numpy()).max()))
        obs, reward, terminated, truncated, _ = env.step(stored.get("action").numpy())
        diffs["next_observation"] = max(
            diffs["next_observation"], float(abs(obs - stored.get(("next", "observation")).double().numpy()).max())
        )
        diffs["reward"] = max(diffs["reward"], abs(reward * scale - float(stored.get(("next", "reward")))))
        diffs["flags_mismatch"] += int(terminated != bool(stored.get(("next", "terminated")))) + int(
            truncated != bool(stored.get(("next", "truncated")))
        )
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return {"steps": episodes * config.env.max_episode_steps, "max_abs_difference": diffs}


def outlier_rows(terms: dict, zs: tuple[torch.Tensor, torch.Tensor], bound: float, top: int, episode_steps: int) -> list[dict]:
    """The ``top`` transitions of largest ``|Q - y|`` (all above ``bound`` if fewer)."""
    order = torch.argsort(terms["td_error"], descending=True)[:top]
    rows = []
    for i in order.tolist():
        row = {"position": i, "episode": i // episode_steps, "step": i % episode_steps}
        row.update({key: round(float(value[i]), 4) for key, value in terms.items()})
        row.update(obs_zscore=round(float(zs[0][i]), 2), next_obs_zscore=round(float(zs[1][i]), 2),
                   next_obs_zscore_feature=int(zs[2][i]), above_bound=bool(terms["td_error"][i] > bound))
        rows.append(row)
    return rows


def summary_of(terms: dict, zs, bound: float, episode_steps: int) -> dict:
    """Buffer-wide figures: quantiles of the terms, counts above ``bound``, per episode the
    largest ``|Q - y|`` of its 10 worst, the same for the last 20 steps of episodes."""
    td, q = terms["td_error"], torch.maximum(terms["q1"], terms["q2"])
    step = torch.arange(td.numel()) % episode_steps
    episode = torch.arange(td.numel()) // episode_steps
    worst_episodes = torch.zeros(int(episode.max()) + 1).index_reduce_(0, episode, td, "amax")
    quantiles = torch.tensor([0.5, 0.99, 1.0])

    def q3(values: torch.Tensor) -> list[float]:
        return [round(float(v), 3) for v in torch.quantile(values.float(), quantiles)]

    return {
        "transitions": td.numel(),
        "bound": bound,
        "td_error_above_bound": int((td > bound).sum()),
        "q_above_bound": int((q > bound).sum()),
        "median_p99_max": {key: q3(value) for key, value in terms.items()},
        "td_error_last20_vs_rest_median": [round(float(td[step >= episode_steps - 20].median()), 3),
                                           round(float(td[step < episode_steps - 20].median()), 3)],
        "worst_episodes": [[int(e), round(float(worst_episodes[e]), 2)] for e in torch.argsort(worst_episodes, descending=True)[:10]],
        "obs_zscore_median_p99_max": q3(zs[0]),
        "next_obs_zscore_median_p99_max": q3(zs[1]),
        "episodes_with_next_obs_zscore_above_10": sorted({int(i) // episode_steps for i in torch.nonzero(zs[1] > 10).flatten()}),
        "share_next_obs_zscore_above_10_per_2000": unusual_by_block(zs, 10.0, 2000),
        "td_error_median_p99_max_where_zscore_above_10_vs_rest": [q3(td[zs[1] > 10]) if (zs[1] > 10).any() else None,
                                                                  q3(td[zs[1] <= 10])],
    }


def markdown(report: dict) -> str:
    lines = [f"# Diagnosis of {report['run']}", ""]
    for frames, part in report["snapshots"].items():
        s = part["summary"]
        lines += [f"## {frames} frames", "", f"- transitions {s['transitions']}, |Q - y| above {s['bound']:.0f}: "
                  f"{s['td_error_above_bound']}, max Q above it: {s['q_above_bound']}",
                  f"- data checks: {json.dumps(part['data_checks'])}"]
        if "replay" in part:
            lines.append(f"- env replay ({part['replay']['steps']} steps): {json.dumps(part['replay']['max_abs_difference'])}")
            lines.append(f"- gymnasium replay: {json.dumps(part['replay_gymnasium']['max_abs_difference'])}")
        lines += ["- median / p99 / max per term:", ""]
        lines += [f"  - {key}: {value}" for key, value in s["median_p99_max"].items()]
        lines += [f"- worst episodes (episode, max |Q - y|): {s['worst_episodes']}",
                  f"- episodes with an s' feature > 10 std from the buffer's mean: {s['episodes_with_next_obs_zscore_above_10']}",
                  f"- |Q - y| median/p99/max there vs elsewhere: {s['td_error_median_p99_max_where_zscore_above_10_vs_rest']}",
                  f"- share of such s' per 2,000 stored steps: {s['share_next_obs_zscore_above_10_per_2000']}", "",
                  "| episode | step | Q1 | Q2 | r | gamma min Qbar | -gamma alpha logpi | (bounded) | bootstrap | trunc "
                  "| y | abs(Q - y) | logpi' | max abs z' | min scale' | max abs z(a) | z-score s / s' (feature) |",
                  "|" + "---|" * 17]
        for r in part["outliers"]:
            lines.append(
                f"| {r['episode']} | {r['step']} | {r['q1']:.1f} | {r['q2']:.1f} | {r['reward']:.2f} | {r['gamma_min_qbar']:.1f} "
                f"| {r['minus_gamma_alpha_logpi']:.2f} | {r['minus_gamma_alpha_logpi_bounded']:.2f} | {r['bootstrap']:.0f} "
                f"| {r['truncated']:.0f} | {r['target']:.1f} | {r['td_error']:.1f} | {r['logpi_next_exact']:.2f} "
                f"| {r['z_next_abs_max']:.2f} | {r['scale_next_min']:.3g} | {r['z_stored_abs_max']:.2f} "
                f"| {r['obs_zscore']:.1f} / {r['next_obs_zscore']:.1f} ({r['next_obs_zscore_feature']}) |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def warmup_buffers(seed: int, scratch: Path) -> dict[str, TensorDictBase]:
    """The warm-up transitions of the project and the stock side of ``parity_sac.py`` at
    ``seed`` (the same code, the frame budget cut to the warm-up)."""
    hyper = Hyper("reach-v3", 4_000, eval_every=4_000, eval_episodes=1, **SETTINGS["default"])
    run_dir = scratch / f"project_seed{seed}"
    trainer = MultiTaskTrainer(apply_overrides(preset("mt_sac", "MT10"), project_overrides(hyper, seed, run_dir, [])))
    trainer.train()
    stock = StockRun(hyper, seed, scratch / f"stock_seed{seed}")
    stock.train()
    return {"project": stored_transitions(trainer), "stock": stock.buffer[: len(stock.buffer)]}


def unusual_episodes(data: TensorDictBase, episode_steps: int) -> dict:
    """Per episode the largest ``s'`` z-score, and the (episode, step, feature) above 10."""
    _, next_z, feature = feature_zscores(data)
    per_episode = next_z.reshape(-1, episode_steps).amax(-1)
    above = torch.nonzero(next_z > 10).flatten().tolist()
    return {
        "max_zscore_per_episode": [round(float(v), 1) for v in per_episode],
        "above_10": [[i // episode_steps, i % episode_steps, int(feature[i])] for i in above],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a run of benchmarks/critic_divergence.py --snapshots")
    parser.add_argument("--warmup-seeds", type=int, nargs="+", default=None, help="only the warm-ups of these seeds")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="snapshots to read (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--draws", type=int, default=8, help="draws of a' per transition")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--bound", type=float, default=None, help="default: largest discounted return")
    parser.add_argument("--replay-episodes", type=int, default=20, help="episodes stepped again (first snapshot only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.warmup_seeds is not None:
        found = {}
        with tempfile.TemporaryDirectory() as scratch:
            for seed in args.warmup_seeds:
                found[seed] = {side: unusual_episodes(data, 200) for side, data in warmup_buffers(seed, Path(scratch)).items()}
                (args.out / "warmup.json").write_text(json.dumps(found, indent=1))
                print(seed, {side: len(v["above_10"]) for side, v in found[seed].items()}, flush=True)
        return
    frames = args.frames or sorted(int(p.name) for p in (args.run / "snapshots").iterdir())
    report = {"run": str(args.run), "snapshots": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for i, f in enumerate(frames):
            trainer = load_snapshot(args.run, f, Path(scratch))
            config = trainer.config
            bound = args.bound or REWARD_MAX * config.env.reward_scale / (1 - config.loss.gamma)
            data = stored_transitions(trainer)
            terms = td_terms(trainer, data, args.draws)
            zs = feature_zscores(data)
            part = {
                "summary": summary_of(terms, zs, bound, config.env.max_episode_steps),
                "outliers": outlier_rows(terms, zs, bound, args.top, config.env.max_episode_steps),
                "data_checks": data_checks(data, config.env.max_episode_steps),
            }
            if i == 0 and args.replay_episodes:
                part["replay"] = replay_env(trainer, data, args.replay_episodes)
                part["replay_gymnasium"] = replay_gymnasium(trainer, data, args.replay_episodes)
            report["snapshots"][str(f)] = part
            (args.out / "diagnosis.json").write_text(json.dumps(report, indent=1))
            (args.out / "diagnosis.md").write_text(markdown(report))
            print(f"{f} frames: {part['summary']['td_error_above_bound']} above the bound", flush=True)


if __name__ == "__main__":
    main()
