"""The compiled update on the PyTorch path at the reference sizes: one graph for the loss,
no recompilation after warm-up, no host synchronisation.

MT10 (10 tasks, batch 1,280) and MT50 (50 tasks, batch 6,400) with the reference networks,
D2R's chain and routing on their PyTorch path (``compile.native_chain=false``: what runs on
CUDA). ``aot_eager`` traces as inductor does (Dynamo graph, AOTAutograd forward and
backward graphs) without inductor's C++ build.

Host synchronisations, checked on the CPU: no operator that reads a tensor's value on the
host (``aten::_local_scalar_dense``, which ``.item()``, ``bool(tensor)`` and the like
dispatch to) in the traced graphs, and none in the profile of a compiled update except
under two operators that do not synchronise on CUDA: ``aten::_assert_async`` (a device-side
assert there, host-side on the CPU) and ``aten::_fused_adam_`` (whose CPU kernel reads the
step count on the host; the CUDA kernel reads it on the device). The eager update has
host reads of its own (the loss check before the optimiser steps, input range checks).
(A ``TorchDispatchMode`` cannot count them: while one is active, compiled code runs eagerly.)
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode
from torchrl.data import Bounded

from d2r_torchrl.data.replay import random_transitions
from d2r_torchrl.modules import make_actor, make_critic
from d2r_torchrl.training import builders
from d2r_torchrl.training.config import apply_overrides, preset
from d2r_torchrl.training.update import make_update

OBS, ACT = 39, 4
HOST_READ = "aten::_local_scalar_dense"
ASYNC_ON_CUDA = {"aten::_assert_async", "aten::_fused_adam_"}


class RecordingBackend:
    """``aot_eager`` that keeps the forward and backward graphs it compiles."""

    def __init__(self) -> None:
        self.graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self.keeper("forward"), bw_compiler=self.keeper("backward"))

    def keeper(self, kind: str) -> Callable:
        def keep(graph: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
            self.graphs[kind].append(graph)
            return graph

        return keep

    def operators(self, kind: str) -> list[Counter[str]]:
        """The aten operators of each ``kind`` graph, by name."""
        return [
            Counter(node.target._schema.name for node in graph.graph.nodes
                    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload))
            for graph in self.graphs[kind]
        ]


def host_syncs(fn: Callable[[], object]) -> Counter[str]:
    """Host reads while ``fn`` runs, by their innermost enclosing operator (torch profiler),
    leaving out those under :data:`ASYNC_ON_CUDA`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    found: Counter[str] = Counter()
    for event in profile.events():
        if event.name != HOST_READ:
            continue
        parents = []
        parent = event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if not ASYNC_ON_CUDA & set(parents):
            found[next((name for name in parents if name.startswith("aten::") and name != "aten::item"), "python")] += 1
    return found


def compiled_update(architecture: str, suite: str, num_tasks: int, batch_size: int, backend: RecordingBackend):
    """The reference update of ``architecture`` at ``suite``'s sizes on the PyTorch path,
    compiled with ``backend``, its loss and a synthetic batch."""
    torch.manual_seed(0)
    config = apply_overrides(preset(architecture, suite), ["compile.native_chain=false"])
    spec = Bounded(-1.0, 1.0, (ACT,))
    kwargs = builders.network_kwargs(config)
    actor = make_actor(architecture, OBS, spec, num_tasks, **kwargs)
    critic = make_critic(architecture, OBS, ACT, num_tasks, **kwargs)
    loss, updater = builders.make_loss(config, actor, critic, num_tasks)
    optimizers = builders.make_optimizers(config, loss)
    update = make_update(loss, optimizers, updater, config.loss.grad_clip_norm, compile=True, backend=backend.backend)
    batch = random_transitions(actor, num_tasks, batch_size, OBS, generator=torch.Generator().manual_seed(1))
    return update, loss, batch


class OperatorNames(TorchDispatchMode):
    """Counts the aten operators dispatched while active, by schema name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suite", "num_tasks", "batch_size"), [("MT10", 10, 1280), ("MT50", 50, 6400)], ids=["MT10", "MT50"]
)
def test_compiled_d2r_update_at_reference_sizes(suite: str, num_tasks: int, batch_size: int) -> None:
    torch._dynamo.reset()
    backend = RecordingBackend()
    update, loss, batch = compiled_update("d2r", suite, num_tasks, batch_size, backend)
    for _ in range(2):  # warm-up: the compiles of make_update's docstring
        update(batch.clone())
    with torch._dynamo.config.patch(error_on_recompile=True):
        syncs = host_syncs(lambda: update(batch.clone()))
        losses = update(batch.clone())
    assert not syncs, f"host synchronisations in the compiled update: {dict(syncs)}"
    assert torch.isfinite(sum(losses[key] for key in ("loss_actor", "loss_qvalue", "loss_alpha")))
    graphs = {kind: backend.operators(kind) for kind in ("forward", "backward")}
    assert all(ops["aten::_local_scalar_dense"] == 0 for kind in graphs for ops in graphs[kind])
    # make_update compiles the loss with fullgraph=True (a graph break would raise): each of
    # its forward graphs holds every module product (one per D2R module and pass) that the
    # loss dispatches when run eagerly (critics one after the other, as compiled)
    with OperatorNames() as eager:
        loss(batch.clone())
    products = [ops["aten::baddbmm"] for ops in graphs["forward"] if ops["aten::baddbmm"]]
    assert products and all(count == eager.calls["aten::baddbmm"] for count in products), products
