"""Milliseconds per update of the D2R authors' implementation (``MTSAC`` with
``DepthRoutePolicy`` / ``FlattenDepthRouteNet``, their MT10/MT50 configuration).

Their package is also called ``torchrl``, so this script runs in its own process with the
checkout first on ``sys.path``; ``bench_update.py --reference DIR`` starts it. Nothing of
their code is part of this repository: pass a checkout of GitHub ``DarkDawn233/D2R_MTRL``.

    python benchmarks/reference_update.py DIR --serve MT10 [--threads N]

It builds that size's update, prints ``READY`` and then runs one update per line read from
its standard input, answering each with ``MS <milliseconds>``, until the input closes:
``bench_update.py`` sends the requests, so that the authors' updates take turns with ours.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Callable

SIZES = {"MT10": (10, 1280), "MT50": (50, 6400)}
OBS, ACT = 39, 4


def network_kwargs(num_tasks: int, base_type) -> dict:
    """Their ``config/mt*/depthroute_rand.json`` network section."""
    return dict(
        base_type=base_type,
        hidden_shapes=[400, 400],
        em_hidden_shapes=[400],
        module_hidden=128,
        module_num=16,
        gate_hiddens=[256, 256],
        top_k=2,
        rescale_prob=True,
        route_as_sample=True,
        use_resnet=True,
        resrouting=True,
        task_num=num_tasks,
        explore_sample=True,
        temperature_sample=True,
    )


def synthetic_batch(num_tasks: int, batch_size: int) -> dict:
    """Their replay layout: ``[batch / T, T, ...]`` numpy arrays, observation ⊕ one-hot."""
    import numpy as np

    rng = np.random.default_rng(0)
    per_task = batch_size // num_tasks
    onehot = np.broadcast_to(np.eye(num_tasks, dtype=np.float32), (per_task, num_tasks, num_tasks))

    def observations():
        return np.concatenate([rng.standard_normal((per_task, num_tasks, OBS), dtype=np.float32), onehot], -1)

    gates = np.zeros((per_task, num_tasks, 16 * 17 // 2), dtype=np.float32)
    offset = 0
    for gate in range(16):  # a valid k-hot route: the first min(2, gate + 1) sources of every gate
        gates[..., offset : offset + min(2, gate + 1)] = 1.0
        offset += gate + 1
    return {
        "obs": observations(),
        "next_obs": observations(),
        "acts": rng.uniform(-1, 1, (per_task, num_tasks, ACT)).astype(np.float32),
        "rewards": rng.standard_normal((per_task, num_tasks, 1), dtype=np.float32),
        "terminals": np.zeros((per_task, num_tasks, 1), dtype=np.float32),
        "task_idxs": np.broadcast_to(np.arange(num_tasks, dtype=np.int64)[None, :, None], (per_task, num_tasks, 1)).copy(),
        "gates_onehot": gates,
    }


def build_reference(num_tasks: int, batch_size: int) -> Callable[[], None]:
    """One call: one update of their ``MTSAC`` on a fixed synthetic batch."""
    import torchrl.networks as networks  # the checkout's package
    import torchrl.policies as policies
    from torchrl.algo import MTSAC

    kwargs = network_kwargs(num_tasks, networks.BASENET_DICT["mlp"])
    policy = policies.POLICY_DICT["DepthRoutePolicy"](input_shape=[OBS, num_tasks], output_shape=2 * ACT, **kwargs)
    critics = [
        networks.NETWORK_DICT["FlattenDepthRouteNet"](input_shape=[OBS + ACT, num_tasks], output_shape=1, **kwargs)
        for _ in range(2)
    ]
    agent = MTSAC(
        algo_name="depthroute",
        env_info={"task_nums": num_tasks, "action_shape": (ACT,)},
        save_dir=tempfile.mkdtemp(prefix="d2r_reference_"),
        pf=policy,
        qf1=critics[0],
        qf2=critics[1],
        discount=0.99,
        tau=0.005,
        plr=3e-4,
        qlr=3e-4,
        batch_size=batch_size,
        max_alpha=1.0,
        temp_reweight=True,
        mask_extreme_task=True,
        task_loss_threshold=3e3,
    )
    batch = synthetic_batch(num_tasks, batch_size)
    return lambda: agent.update(batch)


def timed_ms(update: Callable[[], None]) -> float:
    start = time.perf_counter()
    update()
    return 1000 * (time.perf_counter() - start)


def serve(size: str) -> None:
    """Answer each line of standard input with one timed update (see the module docstring)."""
    update = build_reference(*SIZES[size])
    print("READY", flush=True)
    for _ in sys.stdin:
        print(f"MS {timed_ms(update)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="checkout of DarkDawn233/D2R_MTRL")
    parser.add_argument("--serve", required=True, choices=list(SIZES), help="run updates of this size on request")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, args.reference)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    serve(args.serve)


if __name__ == "__main__":
    main()
