"""Milliseconds of the native D2R module chain alone, as the twin critics run it.

One batch of ``E`` networks (2: the twin critics under ``torch.vmap``) x ``B`` samples
(1,280: MT10), 16 modules of width 128, k = 2, random routes (``--routes deepest``: every
route runs all modules, the most work a pass can have): the forward, the backward
with parameter gradients (the critics' TD term) and without (the critics in the policy
term, their parameters detached), each the fastest of three timed rounds. The pass computes
only the modules each route reaches (printed as modules 2..N per sample); the rate is the
products of those modules (``2 d^2`` flops per module and sample per product set; the
backward with parameter gradients does two sets) over the pass's time, so it includes
everything between them.

    python benchmarks/bench_native_chain.py [--members 2] [--batch 1280] [--threads 1] [--block 64]
        [--routes random|deepest]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from d2r_torchrl.modules.module_chain import NATIVE_BLOCK
from d2r_torchrl.modules.native_chain import load_native_chain
from d2r_torchrl.modules.routing import GateLayout, modules_reached, route_mask

MODULES, SLOTS, WIDTH = 16, 2, 128


def best_ms(fn: Callable[[], object], calls: int, rounds: int = 3) -> float:
    """The fastest round's milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * min(times)


def chain_inputs(members: int, batch: int, seed: int = 0, deepest: bool = False) -> dict[str, torch.Tensor]:
    """Random float32 inputs of the native pass: gate g reads random modules of 0..g, or with
    ``deepest`` module g in every slot (module g + 1 reads module g: every module runs)."""
    generator = torch.Generator().manual_seed(seed)
    gate = torch.arange(MODULES).view(MODULES, 1, 1, 1)
    shape = (MODULES, members, batch, SLOTS)
    index = (torch.rand(shape, generator=generator) * (gate + 1)).long().clamp(max=gate)
    if deepest:
        index = gate.expand(shape).clone()
    return {
        "first": torch.randn(members, batch, WIDTH, generator=generator),
        "index": index,
        "weight": torch.rand(shape, generator=generator),
        "endorsed": (torch.rand(shape, generator=generator) > 0.5).float(),
        "matrices": torch.randn(members, MODULES - 1, WIDTH, WIDTH, generator=generator) / WIDTH**0.5,
        "biases": 0.1 * torch.randn(members, MODULES - 1, WIDTH, generator=generator),
        "grad": torch.randn(members, batch, WIDTH, generator=generator),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block", type=int, default=NATIVE_BLOCK, help="samples per block of the native pass")
    parser.add_argument("--calls", type=int, default=10, help="calls per timed round")
    parser.add_argument("--routes", default="random", choices=["random", "deepest"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = load_native_chain()
    if native is None:
        raise SystemExit("the native extension could not be built here (see the warning above)")
    x = chain_inputs(args.members, args.batch, deepest=args.routes == "deepest")
    mixed, table, active = native.forward(x["first"], x["index"], x["weight"], x["matrices"], x["biases"], args.block)

    def backward(need_params: bool) -> Callable[[], object]:
        return lambda: native.backward(
            x["grad"], x["index"], x["weight"], x["endorsed"], table, active, x["matrices"], need_params, args.block
        )

    passes = {
        "forward": (lambda: native.forward(x["first"], x["index"], x["weight"], x["matrices"], x["biases"], args.block), 1),
        "backward with parameter gradients": (backward(True), 2),
        "backward without": (backward(False), 1),
    }
    selected = route_mask(x["index"].permute(1, 2, 0, 3), GateLayout(MODULES, SLOTS))  # [E, B, N, N]
    products = int(modules_reached(selected)[..., 1:].sum())  # modules 2..N each sample runs
    flops = 2 * products * WIDTH**2
    print(f"{args.members} x {args.batch} samples, {args.threads} thread(s), block {args.block}, "
          f"{products / (args.members * args.batch):.2f} of modules 2..{MODULES} per sample")
    for name, (fn, product_sets) in passes.items():
        ms = best_ms(fn, args.calls)
        print(f"{name:<36} {ms:7.2f} ms  {product_sets * flops / ms / 1e6:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
