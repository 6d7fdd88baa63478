"""Milliseconds per full multi-task SAC update: D2R, Soft Modularization, MH-SAC and MT-SAC,
eager and (``--compile``) compiled, next to the D2R authors' implementation.

One update = loss (twin critics under vmap), backward, per-network clipping and Adam
steps, target soft update and route-temperature refresh (``make_update``). Sizes: MT10
(T=10, batch 1,280) and MT50 (T=50, batch 6,400), all measured in one run; the headline
is the ratio to MT-SAC and, with ``--reference DIR`` (a checkout of GitHub
``DarkDawn233/D2R_MTRL``, run in its own process by ``reference_update.py``), the
authors' D2R update time over ours. Every update being timed takes its turn, one update
each per repeat, the authors' included, so that a slow stretch of a shared machine weighs
on all of them alike.

    python benchmarks/bench_update.py [--sizes MT10 MT50] [--repeats 5] [--threads N] [--device auto]
        [--per-gate-chain] [--compile] [--compile-mode MODE] [--cudagraphs] [--reference DIR] [--json out.json]

``eager`` rows use the default config (on the CPU, D2R's native chain and routing passes);
``--per-gate-chain`` adds ``per-gate`` rows with the PyTorch path of both, the path that runs
on CUDA and under ``torch.compile`` (``compile.native_chain=false``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tensordict import TensorDictBase
from torchrl.data import Bounded

from d2r_torchrl.data.replay import random_transitions
from d2r_torchrl.modules import make_actor, make_critic
from d2r_torchrl.training import builders
from d2r_torchrl.training.config import apply_overrides, preset

SIZES = {"MT10": (10, 1280), "MT50": (50, 6400)}
ARCHITECTURES = ("d2r", "soft_modular", "mh_sac", "mt_sac")
OBS, ACT = 39, 4
HERE = Path(__file__).resolve().parent


def build_update(
    architecture: str, num_tasks: int, batch_size: int, device: torch.device, overrides: list[str]
) -> tuple[Callable[[TensorDictBase], object], TensorDictBase]:
    """The full update of ``architecture`` (its preset with ``overrides``) and a synthetic
    batch of ``batch_size`` transitions (``update(batch.clone())`` runs one update)."""
    config = apply_overrides(preset(architecture, "MT50" if num_tasks > 10 else "MT10"), overrides)
    spec = Bounded(-1.0, 1.0, (ACT,), device=device)
    kwargs = builders.network_kwargs(config)
    actor = make_actor(architecture, OBS, spec, num_tasks, **kwargs).to(device)
    critic = make_critic(architecture, OBS, ACT, num_tasks, **kwargs).to(device)
    loss, updater = builders.make_loss(config, actor, critic, num_tasks)
    optimizers = builders.make_optimizers(config, loss)
    update = builders.make_update_fn(config, loss, optimizers, updater)
    return update, random_transitions(actor, num_tasks, batch_size, OBS, device=device)


def time_updates(
    architectures: list[str], num_tasks: int, batch_size: int, repeats: int, device: torch.device,
    compile_overrides: list[str], authors: AuthorsUpdate | None = None,
) -> dict[str, float]:
    """Median milliseconds of one update per architecture (and ``"authors"`` with
    ``authors``), after warm-up updates (more when compiling). They take turns, one update
    each per repeat, so that a slow stretch of a shared machine weighs on all of them alike
    and their ratios hold."""
    built = {arch: build_update(arch, num_tasks, batch_size, device, compile_overrides) for arch in architectures}
    warmup = 8 if "compile.enabled=true" in compile_overrides else 3  # compiled chain kernels: 1-2 updates
    times: dict[str, list[float]] = {arch: [] for arch in [*architectures, *(["authors"] if authors else [])]}
    for i in range(repeats + warmup):
        for arch, (update, batch) in built.items():
            sample = batch.clone()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            update(sample)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[arch].append(1000 * (time.perf_counter() - start))
        if authors is not None:
            ms = authors()
            if i >= warmup:
                times["authors"].append(ms)
    return {arch: statistics.median(arch_times) for arch, arch_times in times.items()}


class AuthorsUpdate:
    """The authors' D2R update at one size, in its own process (``reference_update.py
    --serve``; their package is also called ``torchrl``), one update per call; a call
    returns the milliseconds the update took there."""

    def __init__(self, reference: str, size: str) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, str(HERE / "reference_update.py"), reference, "--serve", size,
                   "--threads", str(torch.get_num_threads())]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, cwd=reference)
        self._answer("READY")

    def _answer(self, prefix: str) -> str:
        """The child's next line starting with ``prefix`` (its code may print other lines)."""
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.stderr.seek(0)
        raise RuntimeError(f"the authors' implementation stopped:\n{self.stderr.read()[-2000:]}")

    def __call__(self) -> float:
        self.process.stdin.write("update\n")
        self.process.stdin.flush()
        return float(self._answer("MS"))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


def start_authors(reference: str | None, size: str) -> AuthorsUpdate | None:
    """The authors' update at ``size`` (CPU, this process's thread count), or None with a note."""
    if reference is None:
        print("authors' implementation: not measured (pass --reference DIR, a checkout of DarkDawn233/D2R_MTRL)")
        return None
    if not (Path(reference) / "torchrl" / "algo" / "mt_sac.py").exists():
        print(f"authors' implementation: {reference} is not a checkout of DarkDawn233/D2R_MTRL; not measured")
        return None
    try:
        return AuthorsUpdate(reference, size)
    except RuntimeError as error:
        print(f"authors' implementation failed to run; not measured: {error}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--compile", action="store_true", help="also time the compiled update (compile.enabled)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--cudagraphs", action="store_true", help="compiled rows also capture CUDA graphs")
    parser.add_argument("--per-gate-chain", action="store_true",
                        help="also time the update with D2R's PyTorch chain and routing (compile.native_chain=false)")
    parser.add_argument("--reference", default=None, help="checkout of DarkDawn233/D2R_MTRL (CPU only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = builders.resolve_device(args.device)
    variants = {"eager": []}
    if args.per_gate_chain:
        variants["per-gate"] = ["compile.native_chain=false"]
    if args.compile:
        variants["compiled"] = ["compile.enabled=true"] + (
            [f"compile.mode={args.compile_mode}"] if args.compile_mode else []
        ) + (["compile.cudagraphs=true", f"device={device}"] if args.cudagraphs else [])
    if args.reference and device.type != "cpu":
        print("authors' implementation: CPU only; not measured")
    results: dict = {"device": str(device), "threads": torch.get_num_threads(), "reference_ms": {}}
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(f"{'size':6} {'update':9} {'architecture':14} {'ms/update':>10} {'x MT-SAC':>9} {'authors / ours':>15}")
    for size in args.sizes:
        num_tasks, batch_size = SIZES[size]
        authors = start_authors(args.reference, size) if device.type == "cpu" else None
        for variant, overrides in variants.items():
            times = time_updates(args.architectures, num_tasks, batch_size, args.repeats, device, overrides,
                                 authors if variant == "eager" else None)
            if "authors" in times:
                results["reference_ms"][size] = times.pop("authors")
            reference = results["reference_ms"].get(size, float("nan"))
            for arch, ms in times.items():
                ratio = ms / times["mt_sac"] if "mt_sac" in times else float("nan")
                speedup = reference / ms if arch == "d2r" else float("nan")
                print(f"{size:6} {variant:9} {arch:14} {ms:10.1f} {ratio:9.2f} {speedup:15.1f}")
            results.setdefault("ms_per_update", {}).setdefault(variant, {})[size] = times
        if authors is not None:
            authors.close()
            print(f"{size:6} {'authors':9} {'d2r':14} {results['reference_ms'][size]:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
