"""Command line shared by the recipes: ``[--resume RUN_DIR] [key=value ...]``.

Exit status: 0 when the run finished, 2 for a configuration or checkpoint error, a run
directory in use by another process or a checkpoint that could not be written (one
``error: ...`` line), 130 / 143 when SIGINT / SIGTERM stopped it (after saving).
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from d2r_torchrl._extension import MissingExtensionError
from d2r_torchrl.training.checkpointing import CHECKPOINT_NAME, ResumeError, SaveError
from d2r_torchrl.training.config import (
    RESUME_OVERRIDES,
    ConfigError,
    RunConfig,
    apply_overrides,
    describe,
    preset,
    validate,
)
from d2r_torchrl.training.run_lock import RunInUseError
from d2r_torchrl.training.signals import exit_code, signal_name
from d2r_torchrl.training.trainer import NonFiniteLossError, MultiTaskTrainer


class Command(NamedTuple):
    config: RunConfig  # the preset with the overrides (unused when resuming)
    resume: str | None
    overrides: list[str]


def parse(algorithm: str, benchmark: str, argv: Sequence[str] | None = None) -> Command:
    """Preset for ``algorithm`` on ``benchmark`` with the command line's overrides applied."""
    defaults = preset(algorithm, benchmark)
    parser = argparse.ArgumentParser(
        description=f"Train {algorithm} on Meta-World {benchmark} (reference hyper-parameters).",
        epilog="Override any option as key=value, e.g. buffer.kind=stratified env.goals=fixed.\n"
        f"With --resume only {', '.join(RESUME_OVERRIDES)} may be given.\n"
        "Options and their defaults:\n" + describe(defaults),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run stored in RUN_DIR")
    args = parser.parse_args(argv)
    if args.resume:
        return Command(defaults, args.resume, args.overrides)
    return Command(validate(apply_overrides(defaults, args.overrides)), None, args.overrides)


def resume_command(run_dir: Path) -> str:
    """The command line that continues ``run_dir`` with the recipe being run."""
    return f"python {shlex.quote(sys.argv[0])} --resume {shlex.quote(str(run_dir))}"


def main(algorithm: str, benchmark: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of the recipes; returns the process exit code."""
    try:
        command = parse(algorithm, benchmark, argv)
        trainer = MultiTaskTrainer.resume(command.resume, command.overrides) if command.resume else MultiTaskTrainer(command.config)
        print(f"run directory: {trainer.run_dir}", flush=True)
        trainer.train()
    except (ConfigError, ResumeError, SaveError, RunInUseError, NonFiniteLossError, MissingExtensionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved.", file=sys.stderr)
        return exit_code(signal.SIGINT)
    progress = f"{trainer.counters.frames} frames, {trainer.counters.updates} updates"
    if trainer.counters.pending_evaluation:
        progress += " (the evaluation it cut short runs again on resume)"
    if trainer.interrupted:
        print(
            f"interrupted by {signal_name(trainer.stop_signal)} after {progress}; checkpoint saved to "
            f"{trainer.run_dir / CHECKPOINT_NAME}; continue with: {resume_command(trainer.run_dir)}"
        )
        return exit_code(trainer.stop_signal)
    print(f"finished after {progress}; results in {trainer.run_dir} (config.json, scalars/, checkpoint)")
    return 0
