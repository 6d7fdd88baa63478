"""Command line shared by the recipes: ``[--resume RUN_DIR] [key=value ...]``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from d2r_torchrl.training.checkpointing import ResumeError
from d2r_torchrl.training.config import ConfigError, RunConfig, apply_overrides, describe, preset, validate
from d2r_torchrl.training.trainer import NonFiniteLossError, Trainer


def parse(algorithm: str, benchmark: str, argv: Sequence[str] | None = None) -> tuple[RunConfig, str | None]:
    """Preset for ``algorithm`` on ``benchmark`` with the command line's overrides applied."""
    defaults = preset(algorithm, benchmark)
    parser = argparse.ArgumentParser(
        description=f"Train {algorithm} on Meta-World {benchmark} (reference hyper-parameters).",
        epilog="Override any option as key=value, e.g. buffer.kind=prioritized env.goals=fixed.\n"
        "Options and their defaults:\n" + describe(defaults),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run stored in RUN_DIR")
    args = parser.parse_args(argv)
    if args.resume and args.overrides:
        raise ConfigError("--resume continues a run with its saved configuration; drop the overrides.")
    return validate(apply_overrides(defaults, args.overrides)), args.resume


def main(algorithm: str, benchmark: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of the recipes; returns the process exit code."""
    try:
        config, resume = parse(algorithm, benchmark, argv)
        trainer = Trainer.resume(resume) if resume else Trainer(config)
        print(f"run directory: {trainer.run_dir}")
        summary = trainer.train()
    except (ConfigError, ResumeError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"finished: {trainer.counters.state_dict()} {summary}")
    return 0
