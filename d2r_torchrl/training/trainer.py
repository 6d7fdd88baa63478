"""The training loop: env -> collector -> buffer -> loss -> optimisers -> policy."""
from __future__ import annotations

import datetime
import importlib.util
import json
import signal
import time
from pathlib import Path

import torch
import tqdm
from tensordict import TensorDictBase
from torchrl.record.loggers import CSVLogger, Logger, TensorboardLogger, WandbLogger

from d2r_torchrl.data.replay import prepare_transitions
from d2r_torchrl.modules.actor_critic import num_route_logits
from d2r_torchrl.training import builders, checkpointing
from d2r_torchrl.training.config import ConfigError, RunConfig, validate
from d2r_torchrl.training.evaluation import evaluate
from d2r_torchrl.training.update import NonFiniteLossError, sac_update


def make_logger(config: RunConfig, run_dir: Path) -> Logger:
    """CSV (default), TensorBoard or W&B logger writing under ``run_dir``."""
    name = run_dir.name
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(config.log.backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"log.backend={config.log.backend} needs the {package!r} package: pip install {package}")
    if config.log.backend == "tensorboard":
        return TensorboardLogger(name, log_dir=str(run_dir))
    if config.log.backend == "wandb":
        return WandbLogger(name, save_dir=str(run_dir), config=config.to_dict())
    return CSVLogger(name, log_dir=str(run_dir.parent))


def _crossed(before: int, after: int, interval: int) -> bool:
    """True when a multiple of ``interval`` lies in ``(before, after]``."""
    return after // interval > before // interval


class Trainer:
    """Runs multi-task SAC as configured; ``Trainer(config).train()``.

    One *round* collects ``collector.steps_per_task`` steps in every task, then (after
    ``collector.warmup_rounds`` rounds) runs ``collector.updates_per_round`` updates.
    Checkpoints go to ``run_dir/checkpoint`` every ``log.checkpoint_interval_rounds``
    rounds and on SIGINT/SIGTERM; :meth:`resume` continues a run directory.
    """

    def __init__(self, config: RunConfig, run_dir: Path | None = None) -> None:
        self.config = validate(config)
        torch.manual_seed(config.seed)
        self.device = builders.resolve_device(config.device)
        self.tasks = builders.task_names(config)
        self.num_tasks = len(self.tasks)
        self.run_dir = run_dir or self._new_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.eval_envs = builders.make_eval_envs(config, self.tasks)
        actor, critic = builders.make_actor_critic(config, self.eval_envs, self.num_tasks)
        self.actor = actor.to(self.device)
        self.loss, self.target_updater = builders.make_loss(config, self.actor, critic.to(self.device), self.num_tasks)
        self.optimizers = builders.make_optimizers(config, self.loss)
        self.buffer = builders.make_buffer(config, self.num_tasks, str(self.run_dir / "buffer"), self.device)
        self.num_route_logits = num_route_logits(self.actor)
        self.interleave_tasks = self.num_tasks if config.buffer.kind == "stratified" else None
        self.counters = checkpointing.Counters()
        components = {"loss": self.loss, "counters": self.counters, "replay_buffer": self.buffer}
        components.update({f"optim_{name}": opt for name, opt in self.optimizers.items()})
        self.checkpoint = checkpointing.make_checkpoint(components, config.buffer.in_checkpoint)
        self.logger = make_logger(config, self.run_dir)
        self._stop_signal: int | None = None
        self._update_rate = 0.0
        (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def _new_run_dir(self) -> Path:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = self.config.log.name or f"{self.config.network.architecture}_{self.config.env.benchmark}_{stamp}"
        run_dir = Path(self.config.log.root) / name
        if (run_dir / checkpointing.CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another log.name."
            )
        return run_dir

    @classmethod
    def resume(cls, run_dir: str | Path) -> "Trainer":
        """Rebuild a run from ``run_dir/config.json`` and load its checkpoint."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.exists():
            raise checkpointing.ResumeError(f"{run_dir} has no config.json: it is not a run directory.")
        try:
            config = RunConfig.from_dict(json.loads(config_path.read_text()))
        except (ValueError, json.JSONDecodeError) as error:
            raise checkpointing.ResumeError(f"{config_path} is unreadable: {error}") from error
        trainer = cls(config, run_dir)
        checkpointing.load(trainer.checkpoint, run_dir, map_location=trainer.device)
        trainer.loss.after_update()
        return trainer

    @property
    def interrupted(self) -> bool:
        """Whether :meth:`train` stopped on SIGINT/SIGTERM rather than at its frame budget."""
        return self._stop_signal is not None

    # ------------------------------------------------------------------ updates
    def update(self) -> TensorDictBase:
        """Sample a batch and run :func:`sac_update` on it."""
        batch = self.buffer.sample().to(self.device)
        try:
            losses = sac_update(self.loss, self.optimizers, self.target_updater, batch, self.config.loss.grad_clip_norm)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(
                f"{error} At update {self.counters.updates}; the last good checkpoint in {self.run_dir} is kept."
            ) from None
        if self.config.buffer.kind == "prioritized":
            self.buffer.update_tensordict_priority(batch)
        self.counters.updates += 1
        return losses

    # --------------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        """Run until the frame budget is spent or a stop signal arrives.

        Rounds are counted in frames (``steps_per_task * T`` per round), so a collector
        that yields part of a round (``multi_async``) gets its share of the updates.
        Updates start once the buffer holds more than the warm-up frames: in the round
        after the warm-up rounds (after resuming without a saved buffer, too).
        SIGINT/SIGTERM finish the current update, save a checkpoint and return; worker
        processes ignore SIGINT so that they survive it.
        """
        cfg = self.config
        self._stop_signal = None
        frames_per_round = cfg.collector.steps_per_task * self.num_tasks
        total_frames = cfg.collector.total_steps_per_task * self.num_tasks
        warmup_frames = cfg.collector.warmup_rounds * frames_per_round
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        collector = builders.make_collector(cfg, self.tasks, self.actor, self.device, self.counters.frames)
        for sig in previous:
            signal.signal(sig, self._on_signal)
        bar = tqdm.tqdm(total=total_frames, initial=self.counters.frames, unit="frame", disable=not cfg.log.progress_bar)
        summary: dict[str, float] = {}
        try:
            for data in collector:
                self.buffer.extend(prepare_transitions(data, self.num_route_logits, self.interleave_tasks))
                rounds_before = self.counters.rounds
                self.counters.frames += data.numel()
                self.counters.rounds = self.counters.frames // frames_per_round
                if len(self.buffer) > warmup_frames:  # the warm-up rounds run no update
                    self._update_round(round(cfg.collector.updates_per_round * data.numel() / frames_per_round))
                    collector.update_policy_weights_()
                    bar.set_postfix(updates_per_s=f"{self._update_rate:.1f}", success=summary.get("success", float("nan")))
                if _crossed(rounds_before, self.counters.rounds, cfg.eval.interval_rounds) and cfg.eval.episodes_per_task:
                    summary["success"] = self.evaluate()
                if _crossed(rounds_before, self.counters.rounds, cfg.log.checkpoint_interval_rounds):
                    self.save()
                bar.update(data.numel())
                if self._stop_signal is not None or self.counters.frames >= total_frames:
                    self.save()
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            collector.shutdown()
            bar.close()
        return summary

    def _update_round(self, updates: int) -> None:
        """Run ``updates`` updates; log the last losses and, per task, how many of the round's
        updates found it above the extreme-loss threshold (``train/masked_updates``)."""
        started, losses, masked = time.perf_counter(), None, torch.zeros(self.num_tasks, device=self.device)
        for done in range(1, updates + 1):
            losses = self.update()
            masked += losses["task_masked"]
            if self._stop_signal is not None:
                break
        if losses is not None:
            self._update_rate = done / (time.perf_counter() - started)
            self._log_losses(losses)
            self._log_per_task("train/masked_updates", masked)

    def _on_signal(self, signum: int, frame) -> None:
        self._stop_signal = signum

    def evaluate(self) -> float:
        """Meta-World's evaluation protocol (:func:`evaluate`); logs per-task and mean success
        and return; returns the mean success."""
        self.actor.eval()
        result = evaluate(self.actor, self.eval_envs, self.tasks, self.config.eval.episodes_per_task)
        self.actor.train()
        self._log_per_task("eval/success", result.success)
        self._log_per_task("eval/return", result.episode_return)
        return float(result.success.mean())

    def _log_per_task(self, prefix: str, values: torch.Tensor) -> None:
        """Log ``values`` ``[T]`` as ``{prefix}/{task}`` and their mean as ``{prefix}_mean``."""
        step = self.counters.frames
        for name, value in zip(self.tasks, values.tolist()):
            self.logger.log_scalar(f"{prefix}/{name}", value, step=step)
        self.logger.log_scalar(f"{prefix}_mean", float(values.mean()), step=step)

    def _log_losses(self, losses: TensorDictBase) -> None:
        step = self.counters.frames
        for key in ("loss_actor", "loss_qvalue", "loss_alpha", "entropy"):
            self.logger.log_scalar(f"train/{key}", float(losses[key]), step=step)
        for key in ["alpha"] + (["route_depth"] if "route_depth" in losses.keys() else []):
            self._log_per_task(f"train/{key}", losses[key])

    def save(self) -> Path:
        return checkpointing.save(self.checkpoint, self.run_dir, metadata={"step": self.counters.frames})
