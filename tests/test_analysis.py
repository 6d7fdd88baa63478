"""Routing statistics on hand-made routes and a network whose routes are forced."""
import json
import shutil

import pytest
import torch

from d2r_torchrl.analysis import depth_test, logit_spread, routing_statistics, summarise_routes
from d2r_torchrl.analysis.__main__ import main as analysis_main
from d2r_torchrl.modules.d2r import D2RNetwork
from d2r_torchrl.modules.routing import GateLayout, modules_reached, route_depth
from d2r_torchrl.training.config import apply_overrides, preset
from d2r_torchrl.training.trainer import MultiTaskTrainer


def route(edges: dict[int, list[int]], num_modules: int = 4) -> torch.Tensor:
    """``[N, N]`` bool route from ``{gate: [sources]}`` (0-based)."""
    selected = torch.zeros(num_modules, num_modules, dtype=torch.bool)
    for gate, sources in edges.items():
        selected[gate, sources] = True
    return selected


CHAIN = route({0: [0], 1: [1], 2: [2], 3: [3]})  # 1 -> 2 -> 3 -> 4 -> out: depth 4
SHORT = route({0: [0], 1: [0], 2: [0], 3: [0]})  # out reads module 1: depth 1
SKIP = route({0: [0], 1: [0], 2: [1, 2], 3: [0, 3]})  # 1 -> 2 -> 4 (or 1 -> 3 -> 4) -> out: depth 3


def test_route_depth_hand_made():
    assert route_depth(torch.stack([CHAIN, SHORT, SKIP])).tolist() == [4, 1, 3]


def test_modules_reached_hand_made():
    # BYPASS: the output reads modules 1 and 3; module 3 reads module 1; modules 2 and 4 run for nothing
    bypass = route({0: [0], 1: [0], 2: [0, 1], 3: [0, 2]})
    reached = modules_reached(torch.stack([CHAIN, SHORT, SKIP, bypass]))
    assert reached.tolist() == [[True] * 4, [True, False, False, False], [True] * 4, [True, False, True, False]]


def test_summarise_routes_per_task():
    stats = summarise_routes(torch.stack([CHAIN, SHORT, SKIP]), torch.tensor([0, 0, 1]), num_tasks=3)
    assert stats.mean_depth[:2].tolist() == [2.5, 3.0]
    assert stats.mean_modules[:2].tolist() == [2.5, 4.0]  # CHAIN runs 4 modules, SHORT 1, SKIP 4
    assert stats.samples.tolist() == [2.0, 1.0, 0.0]
    torch.testing.assert_close(stats.edge_frequency[0], (CHAIN.float() + SHORT.float()) / 2)
    torch.testing.assert_close(stats.edge_frequency[1], SKIP.float())
    # depths: task 0 has CHAIN (4) and SHORT (1), task 1 has SKIP (3), task 2 nothing
    assert stats.depth_histogram.tolist() == [[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_depth_test_hand_worked():
    same = torch.tensor([[0, 5, 0, 0], [0, 7, 0, 0], [0, 0, 0, 0]])
    assert depth_test(same) == (0.0, 1.0)
    # 20 states at depth 1 against 20 at depth 4: ranks 10.5 and 30.5, H = 12/(40*41) *
    # 20 * (10.5^2 + 30.5^2) - 3*41 = 29.27, over the tie correction 1 - 2*(20^3-20)/(40^3-40)
    # = 0.7505: H = 39 (N - 1 for fully separated groups); chi2(1) tail = 4.2e-10
    separated = torch.tensor([[20, 0, 0, 0], [0, 0, 0, 20]])
    result = depth_test(separated)
    assert result.statistic == pytest.approx(39.0) and result.p_value == pytest.approx(4.22e-10, rel=1e-2)
    with pytest.raises(ValueError, match="two tasks"):
        depth_test(torch.tensor([[3, 1], [0, 0]]))


def test_logit_spread_hand_worked():
    # task 0: logit 0 takes 1 and 3 (std 1), logit 1 stays 0 -> within 0.5; task 1: constant -> 0.
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [4.0, 2.0], [4.0, 2.0]])
    spread = logit_spread(logits, torch.tensor([0, 0, 1, 1]), num_tasks=3)
    torch.testing.assert_close(spread.within_task, torch.tensor([0.5, 0.0, 0.0]))
    # per-task means: task 0 (2, 0), task 1 (4, 2) -> std over the two present tasks 1 and 1.
    assert spread.across_tasks == 1.0
    # overall means (3, 1) -> std 1.
    assert spread.across_logits == 1.0


def test_routing_statistics_on_network_with_forced_routes():
    torch.manual_seed(0)
    net = D2RNetwork(6, 2, 2, num_modules=4, module_width=8, top_k=1, encoder_widths=(8,), router_widths=(8,))
    layout = GateLayout(4, 1)
    wanted = layout.pad(torch.zeros(10), fill=0.0).masked_fill(CHAIN, 5.0)
    with torch.no_grad():
        net.router[-1].weight.zero_()
        net.router[-1].bias.copy_(layout.flatten(wanted))
    stats = routing_statistics(net, torch.randn(12, 6), torch.arange(12) % 2)
    assert stats.mean_depth.tolist() == [4.0, 4.0]
    torch.testing.assert_close(stats.edge_frequency, CHAIN.float().expand(2, 4, 4))
    # the router ignores its input: no spread within or across tasks, all of it across logits
    assert stats.spread.within_task.abs().max() < 1e-6 and stats.spread.across_tasks < 1e-6
    assert abs(stats.spread.across_logits - layout.flatten(wanted).std(correction=0).item()) < 1e-6


def test_analysis_cli_writes_pictures(tmp_path):
    config = apply_overrides(
        preset("d2r", "MT10"),
        [
            "env.benchmark=reach-v3,push-v3",
            "env.max_episode_steps=10",
            "network.num_modules=4",
            "network.module_width=16",
            "collector.steps_per_task=10",
            "collector.warmup_rounds=1",
            "collector.updates_per_round=2",
            "collector.total_steps_per_task=30",
            "buffer.batch_size_per_task=4",
            "eval.episodes_per_task=0",
            "log.checkpoint_interval_rounds=3",
            "log.progress_bar=false",
            f"log.root={tmp_path}",
            "log.name=run",
        ],
    )
    MultiTaskTrainer(config).train()
    assert analysis_main([str(tmp_path / "run")]) == 0
    written = sorted(p.name for p in (tmp_path / "run" / "analysis").glob("*.png"))
    assert written == ["depth.png", "routes.png", "temperatures.png"]
    summary = json.loads((tmp_path / "run" / "analysis" / "routing.json").read_text())
    assert list(summary["tasks"]) == ["reach-v3", "push-v3"]
    assert all(1 <= task["mean_depth"] <= 4 and task["states"] == 10 for task in summary["tasks"].values())
    # a route runs at least the modules of its longest chain
    assert all(task["mean_depth"] <= task["mean_modules"] <= 4 for task in summary["tasks"].values())
    assert summary["logit_spread_across_logits"] > 0
    for task in summary["tasks"].values():
        assert sum(task["depth_histogram"].values()) == 10
    assert 0.0 <= summary["depth_test"]["p_value"] <= 1.0
    # two runs (a copy stands for a second seed): a table with a column per run
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert analysis_main([str(tmp_path / "run"), str(tmp_path / "copy")]) == 0
    table = (tmp_path / "depth_across_runs.md").read_text().splitlines()
    assert "| task | run | copy | mean |" in table
    reach = next(line for line in table if line.startswith("| reach-v3 |")).split("|")
    assert float(reach[2]) == float(reach[3]) == pytest.approx(summary["tasks"]["reach-v3"]["mean_depth"], abs=0.005)
    assert analysis_main([str(tmp_path / "missing")]) == 2
