"""The training loop: env -> collector -> buffer -> loss -> optimisers -> policy."""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import random
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl import timeit
from torchrl.data import ReplayBuffer
from torchrl.data.replay_buffers.samplers import PrioritizedSampler
from torchrl.record.loggers import CSVLogger, Logger, TensorboardLogger, WandbLogger

import d2r_torchrl
from d2r_torchrl.data.replay import (
    annealed_beta,
    example_transitions,
    is_memory_mapped,
    prepare_transitions,
    transition_bytes,
)
from d2r_torchrl.modules.actor_critic import num_route_logits
from d2r_torchrl.objectives.multitask_sac import MultiTaskSACLoss
from d2r_torchrl.training import builders, checkpointing, preflight, signals
from d2r_torchrl.training.components import check_batch, check_buffer, check_collector, describe_buffer
from d2r_torchrl.training.config import RESUME_OVERRIDES, ConfigError, RunConfig, apply_overrides, validate
from d2r_torchrl.training.evaluation import evaluate
from d2r_torchrl.training.hooks import per_task_scalars
from d2r_torchrl.training.progress import RunProgress
from d2r_torchrl.training.run_lock import RunLock
from d2r_torchrl.training.update import NonFiniteLossError, check_finite


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


def seed_everything(seed: int) -> None:
    """Seed the global Python, NumPy and torch RNGs (TorchRL's prioritized sampler draws from
    NumPy's, the per-task samplers from torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Written in the ``buffer`` folder of a run when it creates it: the only kind of ``buffer`` folder a
# new run in an existing directory may delete.
BUFFER_MARKER = ".d2r-torchrl-buffer"


def _crossed(before: int, after: int, interval: int) -> bool:
    """True when a multiple of ``interval`` lies in ``(before, after]``."""
    return after // interval > before // interval


class MultiTaskTrainer:
    """Runs multi-task SAC as configured; ``MultiTaskTrainer(config).train()``.

    The recipes' loop, distinct from ``torchrl.trainers.Trainer`` (which runs the same loss,
    buffers and update with the hooks of :mod:`~d2r_torchrl.training.hooks`): it adds exact
    resume with the updates a stopped round still owes, stops within seconds with a
    checkpoint and exit 130/143, memory-mapped buffers resumed in place, rounds counted per
    task and a lock on its run directory.

    One *round* collects ``collector.steps_per_task`` steps in every task, then (after
    ``collector.warmup_rounds`` rounds) runs ``collector.updates_per_round`` updates.
    Checkpoints go to ``run_dir/checkpoint`` every ``log.checkpoint_interval_rounds``
    rounds and on SIGINT/SIGTERM; :meth:`resume` continues a run directory. A
    memory-mapped replay buffer lives in ``run_dir/buffer`` and is resumed from there.

    Bring your own TorchRL pieces: ``MultiTaskTrainer(config, buffer=my_buffer)`` replaces the
    configured replay buffer and ``trainer.train(my_collector)`` the configured collector
    (built over ``trainer.actor``); :mod:`~d2r_torchrl.training.components` says what each
    must provide and checks it before any work.

    Exact resume: with the sync collector on CPU, fixed goals and the buffer kept, a run
    stopped and resumed ends where the uninterrupted run does (parameters, temperatures,
    counters, buffer) provided every stop falls where all episodes have just ended, i.e.
    ``collector.steps_per_task`` is a multiple of ``env.max_episode_steps``: the simulator
    state of unfinished episodes is not saved, a resumed run starts new ones.

    One process per run directory: the trainer holds the directory's lock
    (:class:`~d2r_torchrl.training.run_lock.RunLock`) from its construction to the end of
    :meth:`train` (:meth:`save` and :meth:`train` take it again, :meth:`close` gives it up);
    another process is refused.
    """

    def __init__(
        self, config: RunConfig, run_dir: Path | None = None, *, buffer: ReplayBuffer | None = None, _resuming: bool = False
    ) -> None:
        self.config = validate(config)
        self.device = builders.resolve_device(config.device)
        seed_everything(config.seed)
        self.tasks = builders.task_names(config)
        self.num_tasks = len(self.tasks)
        if buffer is not None:
            check_buffer(buffer, self.num_tasks, self._warmup_frames(), MultiTaskSACLoss.default_keys.priority)
        self.eval_envs = builders.make_eval_envs(config, self.tasks)
        preflight.check_memory(config, *self._policy_dims(), self.num_tasks, self.device, buffer_given=buffer is not None)
        self.run_dir = Path(run_dir) if run_dir is not None else self._new_run_dir()
        preflight.check_writable(self.run_dir)
        self._run_lock = RunLock(self.run_dir)
        self._run_lock.acquire()  # before anything in the directory is written or deleted
        try:
            self._build(buffer, _resuming)
        except BaseException:
            self._run_lock.release()
            raise

    def _build(self, buffer: ReplayBuffer | None, resuming: bool) -> None:
        """Everything of :meth:`__init__` that reads or writes the (locked) run directory."""
        config = self.config
        if resuming:
            checkpointing.remove_leftovers(self.run_dir)
        else:
            self._check_new_run_dir()
        actor, critic = builders.make_actor_critic(config, self.eval_envs, self.num_tasks)
        self.actor = actor.to(self.device)
        self.loss, self.target_updater = builders.make_loss(config, self.actor, critic.to(self.device), self.num_tasks)
        self.optimizers = builders.make_optimizers(config, self.loss)
        self._update_fn = builders.make_update_fn(config, self.loss, self.optimizers, self.target_updater)
        self._checks_each_update = not (config.compile.enabled or config.compile.cudagraphs)
        self.num_route_logits = num_route_logits(self.actor)
        self.buffer_injected = buffer is not None
        if buffer is None:  # (an empty buffer is falsy)
            buffer = builders.make_buffer(config, self.num_tasks, str(self._buffer_dir), self.device)
        self.buffer = buffer
        self.prioritized = isinstance(self.buffer.sampler, PrioritizedSampler)
        self._check_disk()
        if is_memory_mapped(self.buffer) and not self.buffer_injected:  # its files go to _buffer_dir
            self._mark_buffer_dir()
        self.counters = checkpointing.Counters()
        components = {"loss": self.loss, "counters": self.counters}
        components.update({f"optim_{name}": opt for name, opt in self.optimizers.items()})
        if config.buffer.in_checkpoint or is_memory_mapped(self.buffer):
            components["replay_buffer"] = self.buffer
        self.checkpoint = checkpointing.make_checkpoint(components)
        self.logger = make_logger(config, self.run_dir)
        self._stop_signal: int | None = None
        self._progress: RunProgress | None = None  # the bar of the train() call in progress
        self._saved_counters: dict[str, int] | None = None
        self._batch_checked = False
        self._timed = _phase_totals()  # timeit's totals at the last log
        if not resuming:  # a resumed run rewrites it once its checkpoint has loaded
            self._write_config()

    def _write_config(self) -> None:
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))

    def _new_run_dir(self) -> Path:
        """``log.root/log.name``, or, without a name, a new directory
        ``<architecture>_<benchmark>_<date>-<time>[-<n>]`` created here: ``mkdir`` is atomic,
        so runs launched in the same second (a job array) get distinct directories."""
        root = Path(self.config.log.root)
        if self.config.log.name:
            return root / self.config.log.name
        preflight.check_writable(root)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{self.config.network.architecture}_{self.config.env.benchmark}_{stamp}"
        run_dir, attempt = root / base, 1
        while True:
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                attempt += 1
                run_dir = root / f"{base}-{attempt}"

    def _check_new_run_dir(self) -> None:
        """A new run may use an existing directory without a checkpoint; it deletes only the
        ``buffer`` folder an earlier run of this project left there (it holds
        :data:`BUFFER_MARKER`) and refuses any other."""
        if (self.run_dir / checkpointing.CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir} or choose another log.name."
            )
        if self._buffer_dir.exists():
            if not (self._buffer_dir / BUFFER_MARKER).exists():
                raise ConfigError(
                    f"{self._buffer_dir} exists and was not written by a d2r-torchrl run; move it away or choose "
                    "another log.name (a new run deletes only the buffer folder of an earlier run)."
                )
            shutil.rmtree(self._buffer_dir)

    @property
    def _buffer_dir(self) -> Path:
        """Where the configured memory-mapped replay buffer keeps its files."""
        return self.run_dir / "buffer"

    def _mark_buffer_dir(self) -> None:
        self._buffer_dir.mkdir(parents=True, exist_ok=True)
        (self._buffer_dir / BUFFER_MARKER).touch()

    def close(self) -> None:
        """Give up the run directory's lock (:meth:`train` does at its end)."""
        self._run_lock.release()

    @property
    def _frames_per_round(self) -> int:
        return self.config.collector.steps_per_task * self.num_tasks

    def _warmup_frames(self) -> int:
        return self.config.collector.warmup_rounds * self._frames_per_round

    def _policy_dims(self) -> tuple[int, int]:
        """``(observation size, action size)`` of the tasks."""
        observation_dim, action_spec = builders.policy_specs(self.eval_envs)
        return observation_dim, action_spec.shape[-1]

    def _transition_bytes(self) -> int:
        example = example_transitions(self.num_tasks, *self._policy_dims(), self.num_route_logits)
        kind = self.config.buffer.kind if not self.buffer_injected else "prioritized" if self.prioritized else "uniform"
        return transition_bytes(kind, example, self.num_tasks)

    def _check_disk(self) -> None:
        """Room for the memory-mapped buffer's files and for a checkpoint save (see
        :func:`preflight.check_disk`)."""
        per_transition = self._transition_bytes()
        in_checkpoint = self.config.buffer.in_checkpoint or is_memory_mapped(self.buffer)
        preflight.check_disk(
            self.run_dir,
            capacity=self.buffer.storage.max_size,
            bytes_per_transition=per_transition,
            memory_mapped=is_memory_mapped(self.buffer),
            save_bytes=self._save_bytes(per_transition if in_checkpoint else None),
        )

    def _save_bytes(self, bytes_per_transition: int | None) -> checkpointing.SaveSize:
        """What a checkpoint save writes: the networks and optimiser states, and the replay
        buffer (its transitions when in memory, its priority trees) when
        ``bytes_per_transition`` is given (the buffer goes into checkpoints)."""
        modules = [self.loss, *self.optimizers.values()]
        if bytes_per_transition is None:
            return checkpointing.SaveSize(checkpointing.state_bytes(modules), 0)
        return checkpointing.SaveSize(
            checkpointing.state_bytes(modules), checkpointing.buffer_bytes(self.buffer, bytes_per_transition)
        )

    @classmethod
    def resume(
        cls, run_dir: str | Path, overrides: Sequence[str] = (), *, buffer: ReplayBuffer | None = None
    ) -> "MultiTaskTrainer":
        """Rebuild a run from ``run_dir/config.json`` and load its checkpoint.

        ``overrides`` may change only :data:`RESUME_OVERRIDES` (e.g. ``device=cpu`` to continue a
        CUDA run on a CPU machine). The checkpoint must come from the same configuration and
        code version and be whole (checked before anything is built or anything in ``run_dir``
        changes; ``config.json`` is rewritten once it has loaded). A run trained with a buffer of its
        own needs a new one like it (same class, sampler, storage and capacity) as ``buffer``,
        into which the saved transitions are loaded. Without a saved buffer the run refills
        it first and says so.
        """
        refused = [item for item in overrides if item.split("=", 1)[0].strip() not in RESUME_OVERRIDES]
        if refused:
            raise ConfigError(
                f"A resumed run keeps its configuration; only {', '.join(RESUME_OVERRIDES)} may change, got {refused}."
            )
        run_dir = Path(run_dir)
        config = _read_run_config(run_dir)
        metadata = checkpointing.read_metadata(run_dir)
        checkpointing.check_belongs(run_dir, metadata, config.to_dict(), d2r_torchrl.__version__)
        _check_same_buffer(run_dir, metadata.get("buffer"), buffer)
        checkpointing.verify(run_dir)  # every byte readable, before anything in run_dir changes
        trainer = cls(apply_overrides(config, overrides), run_dir, buffer=buffer, _resuming=True)
        try:
            restored = checkpointing.load(trainer.checkpoint, run_dir, map_location=trainer.device)
            trainer.loss.after_update()
            if "replay_buffer" not in restored:
                trainer._start_buffer_afresh()
            trainer._write_config()  # with the overrides
        except BaseException:
            trainer.close()
            raise
        return trainer

    def _start_buffer_afresh(self) -> None:
        """After resuming without a saved buffer (left out, or saved empty): drop stale
        memory-mapped files and the updates owed to transitions that are gone; say when an
        in-memory buffer left out of checkpoints is refilled."""
        if is_memory_mapped(self.buffer) and not self.buffer_injected:
            shutil.rmtree(self._buffer_dir, ignore_errors=True)
            self._mark_buffer_dir()
        self.counters.pending_updates = 0
        left_out = not (self.config.buffer.in_checkpoint or is_memory_mapped(self.buffer))
        if left_out and self.counters.frames < self.config.collector.total_steps_per_task * self.num_tasks:
            print(
                f"resumed without a replay buffer (buffer.in_checkpoint=false): "
                f"{self.config.collector.warmup_rounds} round(s) refill it before updates continue."
            )

    @property
    def interrupted(self) -> bool:
        """Whether :meth:`train` stopped on SIGINT/SIGTERM rather than at its frame budget."""
        return self._stop_signal is not None

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped :meth:`train`, if any."""
        return self._stop_signal

    # --------------------------------------------------------------------- loop
    def train(self, collector: Iterable[TensorDictBase] | None = None) -> dict[str, float]:
        """:meth:`_train` holding the run directory's lock, which it gives up at the end."""
        self._run_lock.acquire()
        try:
            return self._train(collector)
        finally:
            self._run_lock.release()

    def _train(self, collector: Iterable[TensorDictBase] | None = None) -> dict[str, float]:
        """Run until the frame budget is spent or a stop signal arrives; returns the last
        evaluation's mean success (``{"success": ...}``) when there was one.

        ``collector``: any TorchRL collector running ``self.actor`` (see
        :mod:`~d2r_torchrl.training.components`); by default the configured one for the
        frames left. Either way it is shut down when training ends.

        Each collected batch goes through :meth:`_train_on`: extend the buffer, sample and
        update, send the weights, evaluate and checkpoint when due. Rounds are counted in
        frames (``steps_per_task * T`` per round), so a batch of part of a round gets its
        share of the updates. SIGINT/SIGTERM finish the current update, or end the collection
        or evaluation in progress at the actor's next step (:meth:`_stoppable`), then save a
        checkpoint and return: a batch whose collection was cut is dropped (the checkpoint is
        the state before it), and the updates owed for a stored batch, or its interrupted
        evaluation, are run first by the resumed run.
        """
        if collector is not None:
            check_collector(collector)
        self._batch_checked = False
        total_frames = self.config.collector.total_steps_per_task * self.num_tasks
        summary: dict[str, float] = {}
        owed = self.counters.pending_updates or self.counters.pending_evaluation  # by the run this one resumes
        if self.counters.frames >= total_frames and not owed:
            if collector is not None:
                collector.shutdown()
            return summary
        self._stop_signal = None
        self._progress = RunProgress(total_frames, self.counters.frames, enabled=self.config.log.progress_bar)
        with signals.stop_signals(self._on_signal) as catch_signals:
            if collector is None and self.counters.frames < total_frames:
                collector = self._make_collector()
            catch_signals()
            try:
                if owed:
                    self._train_on(None, collector, summary)
                batches = iter(collector if self.counters.frames < total_frames else ())
                while self._stop_signal is None and self.counters.frames < total_frames:
                    try:
                        with timeit("time/collect"), self._stoppable(self._progress.collected):
                            data = next(batches, None)
                    except signals.StopRequested:
                        break  # the batch in progress is dropped
                    if data is None:
                        break
                    seconds = self._train_on(data, collector, summary)
                    self._progress.batch_done(
                        self.counters.frames, dict(success=summary.get("success", float("nan")), **seconds)
                    )
                if self._saved_counters != self.counters.state_dict():  # not saved at this point yet
                    self.save()
            finally:
                if collector is not None:
                    collector.shutdown()
                self._progress.close()
                self._progress = None
        return summary

    def _train_on(self, data: TensorDictBase | None, collector, summary: dict[str, float]) -> dict[str, str]:
        """One step of the loop for a collected batch (``None``: only the updates owed);
        returns the seconds each phase took (:meth:`_log_timings`)."""
        if data is not None:
            with timeit("time/extend"):
                self._add_batch(data)
        if self.counters.pending_updates:
            with timeit("time/updates", sync=True):  # sample, update, priorities; CUDA work included
                self._run_pending_updates()
            if self.counters.pending_updates:  # cut short by a stop signal
                return {}
            if collector is not None:
                collector.update_policy_weights_()
        if self._round_crossed(self.config.eval.interval_rounds) and self.config.eval.episodes_per_task:
            self._progress.evaluating(self.config.eval.episodes_per_task)
            try:
                with timeit("time/evaluate"), self._stoppable():
                    summary["success"] = self.evaluate()
            except signals.StopRequested:  # nothing of it was logged; the resumed run evaluates first
                self.counters.pending_evaluation = 1
                return {}
            self.counters.pending_evaluation = 0
        if self._round_crossed(self.config.log.checkpoint_interval_rounds):
            with timeit("time/checkpoint"):
                self.save()
        return self._log_timings()

    @contextlib.contextmanager
    def _stoppable(self, on_step: Callable[[int], None] | None = None) -> Iterator[None]:
        """Within the block (a collection or an evaluation) a stop signal raises
        :class:`~signals.StopRequested` at the actor's next call, after putting the global RNGs
        back as they were at entry: the work is dropped and the next checkpoint is the state
        before it began. ``on_step(n)`` hears of each call on a batch of ``n`` (frames)."""
        rng = checkpointing.PortableRNGState()
        before = rng.state_dict()

        def step(args: tuple) -> None:
            if on_step is not None and args and isinstance(args[0], TensorDictBase):
                on_step(args[0].numel())

        try:
            with signals.stop_at_next_call(self.actor, lambda: self._stop_signal, step):
                yield
        except signals.StopRequested:
            rng.load_state_dict(before)
            raise

    def _make_collector(self):
        """The collector for the frames left; building it draws no random number of the run."""
        with torch.random.fork_rng(devices=[]):
            return builders.make_collector(self.config, self.tasks, self.actor, self.device, self.counters.frames)

    def _add_batch(self, data: TensorDictBase) -> None:
        """Store a collected batch, advance the counters and owe its updates (none in warm-up)."""
        if not self._batch_checked:  # the first batch of each train()
            check_batch(data, self.num_tasks)
            self._batch_checked = True
        cfg = self.config.collector
        frames_per_round = self._frames_per_round
        self.buffer.extend(prepare_transitions(data, self.num_route_logits))
        self.counters.batch_start_frames = self.counters.frames
        self.counters.frames += data.numel()
        self.counters.rounds = self.counters.frames // frames_per_round
        if len(self.buffer) > self._warmup_frames():
            self.counters.pending_updates = round(cfg.updates_per_round * data.numel() / frames_per_round)

    def _round_crossed(self, interval: int) -> bool:
        """Whether the last batch crossed a multiple of ``interval`` rounds."""
        return _crossed(self.counters.batch_start_frames // self._frames_per_round, self.counters.rounds, interval)

    def _run_pending_updates(self) -> None:
        """Run the owed updates (a stop signal ends this after the update in progress); log
        the last losses and, per task, how many of them found it above the extreme-loss
        threshold (``train/masked_updates``), the largest ``|Q|`` its samples got over these
        updates (``train/q_max``) and, with clipped TD targets, the fraction of its targets
        the bound clipped (``train/clipped_targets``)."""
        done, losses = 0, None
        masked = torch.zeros(self.num_tasks, device=self.device)
        clipped = torch.zeros(self.num_tasks, device=self.device)
        q_max = torch.full((self.num_tasks,), torch.nan, device=self.device)
        if self.prioritized:
            self.buffer.sampler.beta = self.priority_beta()
        self._progress.updates_started(self.counters.pending_updates)
        while self.counters.pending_updates and self._stop_signal is None:
            losses = self.update()
            masked += losses["task_masked"]
            q_max = torch.fmax(q_max, losses["task_q_max"])  # NaN (task not sampled) ignored
            if "task_clipped" in losses.keys():
                clipped += losses["task_clipped"]
            self.counters.pending_updates -= 1
            done += 1
            self._progress.updated(done)
        if losses is not None:
            if not self._checks_each_update:
                try:
                    check_finite(losses, " The parameters of this process are not saved.")
                except NonFiniteLossError as error:
                    raise self._non_finite(error) from None
            self._log_losses(losses)
            self._log_per_task("train/masked_updates", masked)
            self._log_per_task("train/q_max", q_max)
            if "task_clipped" in losses.keys():
                self._log_per_task("train/clipped_targets", clipped / done)

    # ------------------------------------------------------------------ updates
    def update(self) -> TensorDictBase:
        """Sample a batch and run the configured update on it (see :func:`make_update`); a
        prioritized buffer gets the batch's TD errors as priorities.

        The eager update stops on a non-finite loss before any parameter changes; the
        compiled one has no host synchronisation, and :meth:`_run_pending_updates` checks its
        losses once per round instead.
        """
        with timeit("time/sample"):
            batch = self.buffer.sample().to(self.device)
        try:
            losses = self._update_fn(batch)
        except NonFiniteLossError as error:
            raise self._non_finite(error) from None
        if self.prioritized:
            with timeit("time/priority"):
                batch.set(self.loss.tensor_keys.priority, losses.get(self.loss.tensor_keys.priority))
                self.buffer.update_tensordict_priority(batch)
        self.counters.updates += 1
        return losses

    def priority_beta(self) -> float:
        """PER's importance-sampling exponent for the next updates: linear from
        ``buffer.priority_beta`` to ``buffer.priority_beta_final`` over the frames after the
        warm-up (a function of the frame counter, so a resumed run continues the schedule)."""
        warmup = self._warmup_frames()
        total = self.config.collector.total_steps_per_task * self.num_tasks
        progress = (self.counters.frames - warmup) / max(total - warmup, 1)
        return annealed_beta(self.config.buffer.priority_beta, self.config.buffer.priority_beta_final, progress)

    def _non_finite(self, error: NonFiniteLossError) -> NonFiniteLossError:
        if (self.run_dir / checkpointing.CHECKPOINT_NAME).exists():
            kept = f"the last good checkpoint in {self.run_dir} is kept"
        else:
            kept = f"no checkpoint of this run was saved in {self.run_dir} yet"
        return NonFiniteLossError(f"{error} At update {self.counters.updates}; {kept}.")

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

    # ------------------------------------------------------------------ logging
    def _log_per_task(self, prefix: str, values: torch.Tensor) -> None:
        """Log ``values`` ``[T]`` as ``{prefix}/{task}`` and their mean over tasks (NaN entries,
        e.g. a task absent from the batch, left out) as ``{prefix}_mean``."""
        for key, value in per_task_scalars({prefix: values}, self.tasks, "").items():
            self.logger.log_scalar(key, value, step=self.counters.frames)

    def _log_losses(self, losses: TensorDictBase) -> None:
        step = self.counters.frames
        for key in ("loss_actor", "loss_qvalue", "loss_alpha", "entropy"):
            self.logger.log_scalar(f"train/{key}", float(losses[key]), step=step)
        for key in ["alpha"] + (["route_depth"] if "route_depth" in losses.keys() else []):
            self._log_per_task(f"train/{key}", losses[key])

    def _log_timings(self) -> dict[str, str]:
        """Log the seconds each phase of the loop took since the last call (``time/collect``,
        ``time/extend``, ``time/updates`` with its parts ``time/sample`` and
        ``time/priority``, ``time/evaluate``, ``time/checkpoint``; TorchRL's ``timeit``);
        returns them as ``{phase: "1.2s"}`` for the progress bar."""
        totals, shown = _phase_totals(), {}
        for key, total in totals.items():
            seconds = total - self._timed.get(key, 0.0)
            if seconds > 0:
                self.logger.log_scalar(key, seconds, step=self.counters.frames)
                shown[key.removeprefix("time/")] = f"{seconds:.1f}s"
        self._timed = totals
        return shown

    def save(self) -> Path:
        """Write ``run_dir/checkpoint`` (atomic); the metadata records the configuration, the
        code version and the replay buffer (:meth:`resume` checks them). Raises
        :class:`~checkpointing.SaveError` (the previous checkpoint kept) when it cannot be written."""
        self._run_lock.acquire()
        metadata = {
            "step": self.counters.frames,
            "config": self.config.to_dict(),
            "version": d2r_torchrl.__version__,
            "buffer": {"injected": self.buffer_injected, "description": describe_buffer(self.buffer)},
        }
        in_checkpoint = "replay_buffer" in self.checkpoint.components
        path = checkpointing.save(
            self.checkpoint,
            self.run_dir,
            metadata,
            size=lambda: self._save_bytes(self._transition_bytes() if in_checkpoint else None),
        )
        self._saved_counters = self.counters.state_dict()
        return path


def _phase_totals() -> dict[str, float]:
    """Seconds ``timeit`` has recorded so far under each ``time/...`` phase of the loop."""
    return {key: total for key, total in timeit.todict(percall=False).items() if key.startswith("time/")}


def _check_same_buffer(run_dir: Path, saved: dict | None, buffer: ReplayBuffer | None) -> None:
    """Raise :class:`~checkpointing.ResumeError` when the buffer given to :meth:`MultiTaskTrainer.resume`
    does not match the one the run was trained with (a buffer of its own, or the configured one)."""
    if saved is None or not (saved["injected"] or buffer is not None):
        return  # checkpoints from before buffers were recorded, or configured buffer both times
    if saved["injected"] and buffer is None:
        raise checkpointing.ResumeError(
            f"{run_dir} was trained with a replay buffer of its own, {saved['description']}; the configured "
            "one cannot take its transitions. Pass a new buffer like it: MultiTaskTrainer.resume(run_dir, buffer=...)."
        )
    if not saved["injected"]:
        raise checkpointing.ResumeError(
            f"{run_dir} was trained with the configured replay buffer ({saved['description']}); resume it "
            "without buffer=..."
        )
    if describe_buffer(buffer) != saved["description"]:
        raise checkpointing.ResumeError(
            f"{run_dir} was trained with {saved['description']}; the buffer given is {describe_buffer(buffer)}. "
            "Pass one of the same class, sampler, storage and capacity."
        )


def _read_run_config(run_dir: Path) -> RunConfig:
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise checkpointing.ResumeError(f"{run_dir} has no config.json: it is not a run directory.")
    try:
        return RunConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, json.JSONDecodeError) as error:
        raise checkpointing.ResumeError(f"{config_path} is unreadable: {error}") from error
