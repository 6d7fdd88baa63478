"""The D2R module chain in its two PyTorch forms, side by side on the CPU: the
specification (:func:`d2r_torchrl.modules.d2r_spec.module_chain`, plain autograd over dense
masks) and :class:`~d2r_torchrl.modules.module_chain.ModuleChain` (hand-written backward,
per gate; ``native=False``, as on CUDA).

One forward and backward of the chain with ResRouting along a sampled route, a policy's
chain at MT10 (batch 1,280) or MT50 (6,400), N = 16, width 128, k = 2: milliseconds (median,
the forms taking turns) and aten kernels dispatched (views left out, as in
``kernel_count.py``). The ratio spec / ModuleChain is the figure to read.

    python benchmarks/bench_chain_forms.py [--batch 1280] [--repeats 10] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from d2r_torchrl.modules.d2r_spec import dense_routes, module_chain
from d2r_torchrl.modules.module_chain import run_chain
from d2r_torchrl.modules.routing import GateLayout, RoutingMode, route_slots
from kernel_count import OperatorCount

MODULES, WIDTH, TOP_K = 16, 128, 2


def chain_passes(batch: int) -> dict[str, Callable[[], None]]:
    """Both forms' forward and backward on the same random inputs and route."""
    torch.manual_seed(0)
    layout = GateLayout(MODULES, TOP_K)
    logits = (3 * torch.randn(batch, layout.num_logits)).requires_grad_()
    temperature = torch.ones(batch)
    with torch.no_grad():
        route = route_slots(logits, layout, RoutingMode.SAMPLE, temperature).route
    first = torch.randn(batch, WIDTH).requires_grad_()
    weight = (torch.randn(MODULES - 1, WIDTH, WIDTH) / WIDTH**0.5).requires_grad_()
    bias = (0.1 * torch.randn(MODULES - 1, WIDTH)).requires_grad_()
    direction = torch.randn(batch, WIDTH)

    def slots() -> torch.Tensor:
        routes = route_slots(logits, layout, RoutingMode.BEHAVIOUR, temperature, route, endorse=True)
        chain_layout = lambda t: t.transpose(0, 1).unsqueeze(1)  # noqa: E731  [B, N, k] -> [N, 1, B, k]
        return run_chain(first.unsqueeze(0), chain_layout(routes.sources), chain_layout(routes.weights),
                         chain_layout(routes.endorsed.to(logits.dtype)), weight.unsqueeze(0), bias.unsqueeze(0))[0]

    def spec() -> torch.Tensor:
        return module_chain(first, *dense_routes(logits, route, layout, True), weight, bias)

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: (forward() * direction).sum().backward()

    return {"ModuleChain": step(slots), "specification": step(spec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    passes = chain_passes(args.batch)
    kernels = {}
    for name, run in passes.items():
        with OperatorCount() as counter:
            run()
        kernels[name] = sum(counter.calls.values()) - counter.views
    times: dict[str, list[float]] = {name: [] for name in passes}
    for i in range(args.repeats + 2):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            if i >= 2:
                times[name].append(1000 * (time.perf_counter() - start))
    ms = {name: statistics.median(values) for name, values in times.items()}
    print(f"batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"{'form':14} {'ms':>8} {'kernels':>8}")
    for name in passes:
        print(f"{name:14} {ms[name]:8.1f} {kernels[name]:8}")
    print(f"spec / ModuleChain: {ms['specification'] / ms['ModuleChain']:.2f}x time, "
          f"{kernels['specification'] / kernels['ModuleChain']:.2f}x kernels")


if __name__ == "__main__":
    main()
