"""Where one multi-task SAC update spends its time, per kind of operator (torch profiler, CPU).

    python benchmarks/profile_update.py [--size MT10] [--architectures d2r mt_sac] [--threads 1]
        [--updates 3] [--top 12] [--overrides KEY=VALUE ...]

Builds the update of ``bench_update.py`` (same presets, synthetic batch), runs warm-up
updates, then profiles ``--updates`` updates and prints, per architecture, the self CPU
time per update of each operator group and the largest single operators. Groups:
``matrix products`` (``mm``, ``addmm``, ``bmm``, ``baddbmm``), ``chain kernels`` (the D2R
module chain's autograd function, its compiled kernels, ``embedding_bag`` reads and
``index_add_`` scatters; with the native chain, the default on the CPU, the whole chain
including its module products, which run inside the extension, unseen by the
profiler), ``memory`` (fills and copies, page faults of fresh buffers included) and
``other`` (element-wise maths, routing, optimiser). Shares within one
architecture are steadier than absolute times on a shared machine.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import ARCHITECTURES, SIZES, build_update  # noqa: E402

GROUPS = {  # operator-name prefixes
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "chain kernels": ("ModuleChain", "aten::_embedding_bag", "aten::index_add_", "## Call CompiledFxGraph"),
    "memory": ("aten::fill_", "aten::zero_", "aten::copy_", "aten::empty"),
}


def group_of(name: str) -> str:
    return next((group for group, prefixes in GROUPS.items() if name.startswith(prefixes)), "other")


def profile_update(architecture: str, size: str, updates: int, overrides: list[str]) -> dict[str, float]:
    """Self CPU milliseconds per update by operator (``{name: ms}``)."""
    num_tasks, batch_size = SIZES[size]
    update, batch = build_update(architecture, num_tasks, batch_size, torch.device("cpu"), overrides)
    for _ in range(3):
        update(batch.clone())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(updates):
            update(batch.clone())
    return {event.key: event.self_cpu_time_total / 1000 / updates for event in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="MT10", choices=list(SIZES))
    parser.add_argument("--architectures", nargs="+", default=["d2r", "mt_sac"], choices=list(ARCHITECTURES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="largest single operators to list")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. compile.native_chain=false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.size}, {args.threads} torch thread(s), self CPU ms per update (share)")
    for architecture in args.architectures:
        times = profile_update(architecture, args.size, args.updates, args.overrides)
        total = sum(times.values())
        groups: dict[str, float] = defaultdict(float)
        for name, ms in times.items():
            groups[group_of(name)] += ms
        print(f"\n{architecture}: {total:.1f} ms")
        for group, ms in sorted(groups.items(), key=lambda item: -item[1]):
            print(f"  {group:16} {ms:8.1f}  ({ms / total:4.0%})")
        print("  largest operators:")
        for name, ms in sorted(times.items(), key=lambda item: -item[1])[: args.top]:
            print(f"    {name[:48]:48} {ms:8.1f}")


if __name__ == "__main__":
    main()
