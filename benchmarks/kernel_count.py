"""Operator calls per full multi-task SAC update on the PyTorch path: a CPU stand-in for the
launch overhead of a GPU update.

One update as the trainer runs it (``make_update``: loss with twin critics, backward,
per-network clipping and Adam steps, target soft update, route-temperature refresh), with
D2R's PyTorch chain and routing (``compile.native_chain=false``, what runs on CUDA and
under ``torch.compile``), on a synthetic batch at MT10 (10 tasks, batch 1,280) and,
with ``--sizes MT10 MT50``, MT50 (50 tasks, batch 6,400). Counted:

* ``eager``: the aten operators the update dispatches (forward, backward in the autograd
  engine's thread and optimiser), counted by a ``TorchDispatchMode``; ``eager kernels``
  leaves out views and other metadata-only operators (``OpOverload.is_view``, ``detach``,
  ``empty``), which launch no kernel.
* ``compiled``: the calls in the ``call`` functions of the code that inductor generates
  for the compiled update (``compile.enabled=true``; CPU backend), that is its fused loop
  kernels plus the library calls (``extern_kernels.*``: matrix products) and fallback aten
  operators it leaves outside them. On a GPU each such call is one launch.
  ``host syncs`` counts ``_local_scalar_dense``/``.item()`` in that code (none expected).

    python benchmarks/kernel_count.py [--sizes MT10 MT50] [--architectures d2r mt_sac] [--no-compile]
        [--json benchmarks/out/kernel_count.json]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_update import SIZES, build_update

PYTORCH_PATH = ["compile.native_chain=false"]
COMPILED = [*PYTORCH_PATH, "compile.enabled=true", "compile.backend=inductor"]
METADATA_OPS = {"aten::detach", "aten::empty", "aten::empty_strided", "aten::lift_fresh"}
# a line of a generated ``call`` that launches work: a fused kernel, a library call or an aten fallback
CALL = re.compile(
    r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+"
    r"|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\("
)
HOST_SYNC = re.compile(r"_local_scalar_dense|\.item\(\)")


class OperatorCount(TorchDispatchMode):
    """Counts every aten operator dispatched while active, by name (``aten::add.Tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func._schema.name) + ("." + func._overloadname if func._overloadname != "default" else "")] += 1
        if func.is_view or str(func._schema.name) in METADATA_OPS:
            self.views += 1
        return func(*args, **(kwargs or {}))


def count_eager(update: Callable, batch) -> dict:
    """Aten operators of one eager update (after one warm-up update, which creates Adam's state)."""
    update(batch.clone())
    sample = batch.clone()
    with OperatorCount() as counter:
        update(sample)
    total = sum(counter.calls.values())
    return {
        "ops": total,
        "kernels": total - counter.views,
        "host_syncs": counter.calls["aten::_local_scalar_dense"],
        "top": dict(counter.calls.most_common(12)),
    }


def count_compiled(update: Callable, batch) -> dict:
    """Calls in the inductor code of one compiled update (the first call compiles; inductor's
    own counter of generated loop kernels is reported next to it)."""
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    metrics.reset()
    _, sources = run_and_get_code(update, batch.clone())
    calls: Counter[str] = Counter()
    for source in sources:
        body = source[source.find("def call(") :]
        for line in body.splitlines():
            match = CALL.match(line)
            if match:
                name = match.group(1)
                calls["fused kernel" if name.startswith(("cpp_fused", "triton_")) else name] += 1
    return {
        "calls": sum(calls.values()),
        "fused_kernels": calls["fused kernel"],
        "generated_kernel_count": metrics.generated_kernel_count,
        "graphs": len(sources),
        "host_syncs": sum(len(HOST_SYNC.findall(source)) for source in sources),
        "by_kind": dict(calls.most_common(12)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["MT10"], choices=list(SIZES))
    parser.add_argument("--architectures", nargs="+", default=["d2r", "mt_sac"])
    parser.add_argument("--no-compile", action="store_true", help="eager counts only")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "out" / "kernel_count.json"))
    args = parser.parse_args()
    device = torch.device("cpu")
    results: dict = {}
    for size in args.sizes:
        num_tasks, batch_size = SIZES[size]
        for arch in args.architectures:
            row = {"eager": count_eager(*build_update(arch, num_tasks, batch_size, device, PYTORCH_PATH))}
            if not args.no_compile:
                row["compiled"] = count_compiled(*build_update(arch, num_tasks, batch_size, device, COMPILED))
            results.setdefault(size, {})[arch] = row
            print(f"{size} {arch}: counted", flush=True)
    header = ("size", "architecture", "eager ops", "eager kernels", "eager syncs", "compiled calls", "fused", "compiled syncs")
    print("\n" + " ".join(f"{name:>14}" for name in header))
    for size, rows in results.items():
        for arch, row in rows.items():
            eager, compiled = row["eager"], row.get("compiled", {})
            cells = (size, arch, eager["ops"], eager["kernels"], eager["host_syncs"],
                     compiled.get("calls", "-"), compiled.get("fused_kernels", "-"), compiled.get("host_syncs", "-"))
            print(" ".join(f"{cell!s:>14}" for cell in cells))
        if {"d2r", "mt_sac"} <= rows.keys():
            d2r, mt_sac = rows["d2r"], rows["mt_sac"]
            ratios = {"eager kernels": d2r["eager"]["kernels"] / mt_sac["eager"]["kernels"]}
            if "compiled" in d2r:
                ratios["compiled calls"] = d2r["compiled"]["calls"] / mt_sac["compiled"]["calls"]
            results[size]["d2r_over_mt_sac"] = ratios
            print(f"{size:5} D2R / MT-SAC: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
