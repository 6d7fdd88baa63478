"""Tests of the baseline networks (METHOD.md section 4): MT-SAC, MH-SAC, Soft Modularization."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d2r_torchrl.modules import MultiTaskMLP, SoftModularNetwork, make_network

IN, TASKS, OUT = 6, 3, 4


def inputs(*batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(*batch, IN, generator=generator)
    return features, torch.randint(0, TASKS, batch, generator=generator)


@pytest.mark.parametrize("architecture", ["mt_sac", "mh_sac"])
def test_mlp_forward_shapes(architecture: str) -> None:
    net = make_network(architecture, IN, TASKS, OUT, hidden_widths=(16, 16))
    features, task_id = inputs(5)
    assert net(features, task_id).shape == (5, OUT)
    assert net(features, task_id[:, None]).shape == (5, OUT)
    features, task_id = inputs(2, 5)
    assert net(features, task_id).shape == (2, 5, OUT)
    assert make_network(architecture, IN, TASKS, OUT).trunk[0].in_features == IN + TASKS


def test_mt_sac_reads_state_and_one_hot() -> None:
    torch.manual_seed(0)
    net = MultiTaskMLP(IN, TASKS, OUT, hidden_widths=(16, 16))
    features, task_id = inputs(5)
    one_hot = F.one_hot(task_id, TASKS).float()
    expected = net.head(net.trunk(torch.cat([features, one_hot], -1)))
    torch.testing.assert_close(net(features, task_id), expected)


def test_mh_sac_selects_each_samples_task_head() -> None:
    torch.manual_seed(0)
    net = MultiTaskMLP(IN, TASKS, OUT, hidden_widths=(16, 16), multi_head=True)
    assert net.head.out_features == TASKS * OUT
    features, task_id = inputs(7)
    out = net(features, task_id)
    for i in range(7):
        t = int(task_id[i])
        hidden = net.trunk(torch.cat([features[i], F.one_hot(task_id[i], TASKS).float()]))
        rows = slice(t * OUT, (t + 1) * OUT)
        expected = net.head.weight[rows] @ hidden + net.head.bias[rows]
        torch.testing.assert_close(out[i], expected)
    # another task's head gives another answer for the same state
    same_state = features[:1].expand(TASKS, IN)
    per_task = net(same_state, torch.arange(TASKS))
    assert not torch.allclose(per_task[0], per_task[1])


@pytest.mark.parametrize("preset, layers, modules", [("shallow", 2, 2), ("deep", 4, 4)])
def test_soft_modular_shapes(preset: str, layers: int, modules: int) -> None:
    net = make_network("soft_modular", 39, 10, 8, preset=preset)
    assert (net.num_layers, net.num_modules) == (layers, modules)
    features = torch.randn(2, 5, 39)
    task_id = torch.randint(0, 10, (2, 5))
    assert net(features, task_id).shape == (2, 5, 8)
    gating = torch.randn(2, 5, 256)
    probs, last = net.routing_probabilities(gating)
    assert len(probs) == layers - 1
    for p in probs:
        assert p.shape == (2, 5, modules, modules)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 5, modules))
    assert last.shape == (2, 5, modules)
    torch.testing.assert_close(last.sum(-1), torch.ones(2, 5))


def test_soft_modular_unknown_preset() -> None:
    with pytest.raises(ValueError, match="preset"):
        make_network("soft_modular", IN, TASKS, OUT, preset="huge")


def test_soft_modular_routing_by_hand() -> None:
    """Known layer-0 logits [[1, 0], [-1, 2]] and final logits [0.5, -0.5]."""
    torch.manual_seed(0)
    net = SoftModularNetwork(
        IN, TASKS, OUT, num_layers=2, num_modules=2, module_width=8,
        encoder_widths=(12, 10), gating_widths=(6, 6),
    )
    with torch.no_grad():
        net.route_logits[0].weight.zero_()
        net.route_logits[0].bias.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
        net.last_logits.weight.zero_()
        net.last_logits.bias.copy_(torch.tensor([0.5, -0.5]))
    # softmax over sources, row by row (row = destination module)
    e = math.e
    p = [[e / (e + 1), 1 / (e + 1)], [e**-1 / (e**-1 + e**2), e**2 / (e**-1 + e**2)]]
    last = [1 / (1 + e**-1), e**-1 / (1 + e**-1)]

    features, task_id = inputs(5)
    gating = torch.randn(5, 6)
    probs, final = net.routing_probabilities(gating)
    torch.testing.assert_close(probs[0], torch.tensor(p).expand(5, 2, 2))
    torch.testing.assert_close(final, torch.tensor(last).expand(5, 2))

    seen: dict[int, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0]))
        for i, module in enumerate(net.layers[1])
    ]
    out = net(features, task_id)
    for hook in hooks:
        hook.remove()

    with torch.no_grad():
        state = torch.relu(net.state_encoder(features))
        first = [net.layers[0][s](state) for s in range(2)]
        mixed = [torch.relu(p[d][0] * first[0] + p[d][1] * first[1]) for d in range(2)]
        second = [net.layers[1][d](mixed[d]) for d in range(2)]
        expected = net.head(torch.relu(last[0] * second[0] + last[1] * second[1]))
    for d in range(2):
        torch.testing.assert_close(seen[d], mixed[d])
    torch.testing.assert_close(out, expected)
