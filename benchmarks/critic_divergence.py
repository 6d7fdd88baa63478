"""Per-round critic statistics of one project MT-SAC run on one task (the parity settings).

    python benchmarks/critic_divergence.py --seed 0 --steps 22000 --out /tmp/div_per \
        --project buffer.kind=prioritized loss.extreme_loss_rule=reference
    python benchmarks/critic_divergence.py --seed 0 --steps 22000 --out /tmp/div_uniform \
        --project buffer.kind=uniform loss.extreme_loss_rule=reference
    python benchmarks/critic_divergence.py --steps 30000 --out /tmp/div_clip --from /tmp/div_per \
        --project loss.extreme_loss_rule=clip      # continue a copy of a run with other settings

(``--from`` continues from the run's last checkpoint, or with ``--from-frames N`` from its
snapshot at ``N`` frames; for the 20k state of RESULTS.md stop the first run at ``--steps 20000``.
``--replace-episode E`` then overwrites stored episode ``E`` with a copy of episode ``E + 1``
(one-task runs), e.g. to continue without the transitions where a divergence starts. The
same command continues an interrupted run.)

Writes ``OUT/rounds.jsonl``: after every round of updates the mean and max ``|Q - y|``
(``td_error``, the larger critic), how many updates masked the task, the mean task loss,
critic loss and entropy, the last alpha; after every evaluation (every 2,000 steps, 20
episodes) the success. ``--from RUN_DIR`` copies that run's checkpoint (saved at each
evaluation, replay buffer included) and continues it with ``--project`` applied to its
configuration. ``--snapshots`` keeps a copy of every checkpoint in ``OUT/snapshots/<frames>``
and saves one more after the first round whose largest ``|Q - y|`` exceeds
``--outlier-threshold`` (for ``benchmarks/diagnose_divergence.py``). One torch thread.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_sac import SETTINGS, Hyper, project_overrides  # noqa: E402

from d2r_torchrl.training import checkpointing  # noqa: E402
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME  # noqa: E402
from d2r_torchrl.training.config import RunConfig, apply_overrides, preset  # noqa: E402
from d2r_torchrl.training.trainer import MultiTaskTrainer  # noqa: E402

STATISTICS = ("td_mean", "td_max", "masked", "task_loss", "critic_loss", "entropy", "alpha")


def continue_copy(source: Path, out: Path, overrides: list[str], steps: int, frames: int | None = None) -> MultiTaskTrainer:
    """A run in ``out`` configured as ``source`` with ``overrides`` applied, starting from the
    state of ``source``'s checkpoint (or, with ``frames``, of its snapshot
    ``source/snapshots/<frames>``). The checkpoint is loaded into the new run without
    :meth:`MultiTaskTrainer.resume`'s check that the configuration is unchanged; the new run's
    own checkpoints then carry the new configuration."""
    config = RunConfig.from_dict(json.loads((source / "config.json").read_text()))
    config = apply_overrides(config, [*overrides, f"collector.total_steps_per_task={steps}", f"log.root={out.parent}", f"log.name={out.name}"])
    out.mkdir(parents=True, exist_ok=True)
    trainer = MultiTaskTrainer(config, out)
    checkpointing.load(trainer.checkpoint, source if frames is None else source / "snapshots" / str(frames),
                       map_location=trainer.device)
    trainer.loss.after_update()
    return trainer


def replace_episode(trainer: MultiTaskTrainer, episode: int) -> None:
    """Overwrite the stored transitions of ``episode`` (one-task run, positions
    ``episode * L ... (episode + 1) * L - 1``) with a copy of the next episode's."""
    steps = trainer.config.env.max_episode_steps
    stored = trainer.buffer.storage._storage  # the storage's tensordict; its length is unchanged
    if trainer.num_tasks != 1 or len(trainer.buffer) < (episode + 2) * steps:
        raise ValueError(f"--replace-episode needs a one-task run holding episodes {episode} and {episode + 1}.")
    stored[episode * steps : (episode + 1) * steps] = stored[(episode + 1) * steps : (episode + 2) * steps].clone()


def keep_snapshots(trainer: MultiTaskTrainer, threshold: float) -> None:
    """Copy every checkpoint to ``run_dir/snapshots/<frames>``; save one more after the first
    round of updates whose largest TD error exceeds ``threshold`` (read from ``rounds.jsonl``)."""
    save, run_updates = trainer.save, trainer._run_pending_updates
    log_path, crossed = trainer.run_dir / "rounds.jsonl", [False]

    def saved_with_copy() -> Path:
        path = save()
        target = trainer.run_dir / "snapshots" / str(trainer.counters.frames)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / CHECKPOINT_NAME)
        return path

    def updates_then_snapshot() -> None:
        run_updates()
        if crossed[0] or not log_path.exists():
            return
        last = json.loads(log_path.read_text().splitlines()[-1])
        if last.get("td_max", 0.0) > threshold and last["frames"] == trainer.counters.frames:
            crossed[0] = True
            trainer.save()

    trainer.save, trainer._run_pending_updates = saved_with_copy, updates_then_snapshot


def instrument(trainer: MultiTaskTrainer, log_path: Path) -> None:
    """Record the statistics of every update and write one line per round and evaluation."""
    log, rows, td_errors = log_path.open("a"), [], []
    update, evaluate, forward = trainer.update, trainer.evaluate, trainer.loss.forward

    def recorded_forward(tensordict):
        losses = forward(tensordict)
        td_errors.append(tensordict.get("td_error"))  # written into the batch by the loss
        return losses

    def write(record: dict) -> None:
        log.write(json.dumps({"frames": trainer.counters.frames, **record}) + "\n")
        log.flush()

    def recorded_update():
        losses = update()
        td_error = td_errors.pop()
        rows.append([float(td_error.mean()), float(td_error.max()), float(losses["task_masked"].any()),
                     float(losses["task_loss"].sum()), float(losses["loss_qvalue"]), float(losses["entropy"]),
                     float(losses["alpha"].mean())])
        if trainer.counters.updates % trainer.config.collector.updates_per_round == 0:
            stats = torch.tensor(rows)
            record = dict(zip(STATISTICS, stats.mean(0).tolist()))
            record.update(td_max=float(stats[:, 1].max()), masked=int(stats[:, 2].sum()), alpha=float(stats[-1, 6]))
            write(record)
            rows.clear()
        return losses

    def recorded_evaluate() -> float:
        success = evaluate()
        write({"success": success})
        return success

    trainer.update, trainer.evaluate, trainer.loss.forward = recorded_update, recorded_evaluate, recorded_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--steps", type=int, default=22_000)
    parser.add_argument("--set", dest="setting", choices=list(SETTINGS), default="default")
    parser.add_argument("--project", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--from", dest="source", type=Path, help="continue a copy of this run directory")
    parser.add_argument("--from-frames", type=int, default=None, help="... from its snapshot at these frames")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--snapshots", action="store_true", help="keep every checkpoint (see above)")
    parser.add_argument("--replace-episode", type=int, default=None,
                        help="with --from: replace this stored episode by a copy of the next one before continuing")
    parser.add_argument("--outlier-threshold", type=float, default=1_000.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if (args.out / CHECKPOINT_NAME).exists():  # the same command continues the run
        trainer = MultiTaskTrainer.resume(args.out)
    elif args.source is not None:
        trainer = continue_copy(args.source, args.out, args.project, args.steps, args.from_frames)
        if args.replace_episode is not None:
            replace_episode(trainer, args.replace_episode)
    else:
        hyper = Hyper(args.task, args.steps, eval_every=2_000, eval_episodes=20, **SETTINGS[args.setting])
        config = apply_overrides(preset("mt_sac", "MT10"), project_overrides(hyper, args.seed, args.out, args.project))
        trainer = MultiTaskTrainer(config)
    instrument(trainer, args.out / "rounds.jsonl")
    if args.snapshots:
        keep_snapshots(trainer, args.outlier_threshold)
    trainer.train()


if __name__ == "__main__":
    main()
