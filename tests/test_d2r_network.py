"""Tests of the D2R network (METHOD.md section 2): size, routing modes, ResRouting,
TorchRL integration (vmapped critic ensemble, torch.compile), input checks, and the
import of reference (``DepthRouteNet``) weights.

Expected values come from computations written here independently of the library:
per-gate loops over the flat router logits, exact probabilities of sampling without
replacement by enumerating orderings, and a reference-style toy network.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn
from torchrl.data import Bounded

from d2r_torchrl.modules import (
    D2RNetwork,
    RoutingMode,
    load_reference_state_dict,
    make_actor,
    make_critic,
    set_routing_mode,
)
from d2r_torchrl.modules import d2r_spec
from d2r_torchrl.modules.native_chain import load_native_chain
from d2r_torchrl.modules.routing import GateLayout, select_routes

IN, TASKS, OUT = 6, 3, 4
SMALL = dict(num_modules=6, module_width=16, top_k=2, encoder_widths=(24, 20), router_widths=(18,))


def small_net(seed: int = 0, **overrides) -> D2RNetwork:
    torch.manual_seed(seed)
    return D2RNetwork(IN, TASKS, OUT, **{**SMALL, **overrides})


def batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, IN, generator=generator)
    task_id = torch.randint(0, TASKS, (n,), generator=generator)
    return features, task_id


def gates(flat: torch.Tensor, num_modules: int) -> tuple[torch.Tensor, ...]:
    """Split ``[..., N(N+1)/2]`` into the per-gate chunks of sizes 1..N (reference order)."""
    return flat.split(list(range(1, num_modules + 1)), dim=-1)


# --------------------------------------------------------------------------- size


def test_mt10_policy_parameter_count() -> None:
    net = D2RNetwork(39, 10, 8)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == 684_240
    assert "route_temperature" in net.state_dict()
    assert all(name != "route_temperature" for name, _ in net.named_parameters())
    assert trainable + net.route_temperature.numel() == 684_250  # the reference's figure
    actor = make_actor("d2r", 39, Bounded(-1.0, 1.0, (4,)), 10)
    assert sum(p.numel() for p in actor.parameters()) == 684_240


# --------------------------------------------------------------------------- top-k


def test_topk_is_deterministic_and_selects_min_k_candidates() -> None:
    net = small_net()
    features, task_id = batch(32)
    with set_routing_mode("topk"):
        out, logits, route = net(features, task_id)
        net.route_temperature.fill_(7.0)  # top-k ignores the routing temperature
        out2, _, route2 = net(features, task_id)
    assert torch.equal(out, out2) and torch.equal(route, route2)
    n, k = net.num_modules, net.top_k
    for g, (z, chosen) in enumerate(zip(gates(logits, n), gates(route, n))):
        assert (chosen.sum(-1) == min(k, g + 1)).all()
        expected = torch.zeros_like(chosen).scatter(-1, z.topk(min(k, g + 1), -1).indices, True)
        assert torch.equal(chosen, expected), f"gate {g} is not the top-k of its logits"


def _reachable_modules(route: torch.Tensor, num_modules: int) -> set[int]:
    """Modules whose output can reach the head through the selected sources (one sample)."""
    chunks = gates(route, num_modules)
    frontier = [j for j in range(num_modules) if chunks[-1][j]]
    reached: set[int] = set()
    while frontier:
        j = frontier.pop()
        if j not in reached:
            reached.add(j)
            if j > 0:  # module j (0-based) is fed by gate j - 1
                frontier += [s for s in range(j) if chunks[j - 1][s]]
    return reached


def test_any_batch_shape() -> None:
    net = small_net()
    features, task_id = batch(10)
    with set_routing_mode("topk"):
        flat = net(features, task_id)[0]
        nested = net(features.view(2, 5, IN), task_id.view(2, 5, 1))[0]
        empty = net(features[:0], task_id[:0])[0]
    assert nested.shape == (2, 5, OUT) and empty.shape == (0, OUT)
    torch.testing.assert_close(nested.reshape(10, OUT), flat)


def module_parameters(tensors: dict[str, torch.Tensor], j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of module ``j + 1`` (0-based ``j``) in a network's named parameters, or
    in a dict of their gradients: ``first_module`` or a slice of the stacked modules."""
    if j == 0:
        return tensors["first_module.weight"], tensors["first_module.bias"]
    return tensors["module_weight"][j - 1], tensors["module_bias"][j - 1]


def test_topk_output_depends_only_on_selected_sources() -> None:
    net = small_net(num_modules=8)
    features, task_id = batch(1, seed=3)
    with set_routing_mode("topk"), torch.no_grad():
        out, _, route = net(features, task_id)
        reached = _reachable_modules(route[0], net.num_modules)
        unreached = sorted(set(range(net.num_modules)) - reached)
        assert unreached and reached, "this seed must leave some modules off the route"
        for j, changes in [(j, False) for j in unreached] + [(max(reached), True)]:
            perturbed = copy.deepcopy(net)
            weight, bias = module_parameters(dict(perturbed.named_parameters()), j)
            weight.add_(torch.randn_like(weight))
            bias.add_(1.0)
            new_out, _, new_route = perturbed(features, task_id)
            assert torch.equal(new_route, route)
            assert torch.equal(new_out, out) != changes, f"module {j}, on the route: {changes}"


# --------------------------------------------------------------------------- sampling

LOGITS_OUT = [1.0, 0.0, -0.5, 2.0]  # gate with 4 candidates, k = 2
PAIRS = list(itertools.combinations(range(4), 2))
CHI2_5DOF_P001 = 20.515  # chi-square quantile, 5 degrees of freedom, p = 0.001


def _pair_probabilities(logits: list[float], temperature: float) -> list[float]:
    """Exact P(chosen set = {a, b}) for 2 draws without replacement from softmax(z / tau)."""
    weights = [math.exp(z / temperature) for z in logits]
    p = [w / sum(weights) for w in weights]
    prob = {pair: 0.0 for pair in PAIRS}
    for first, second in itertools.permutations(range(4), 2):
        prob[tuple(sorted((first, second)))] += p[first] * p[second] / (1.0 - p[first])
    return [prob[pair] for pair in PAIRS]


def _sample_pairs(temperature: float, samples: int = 20_000) -> torch.Tensor:
    """Empirical frequencies of the chosen pairs of the 4-candidate gate via ``select_routes``."""
    layout = GateLayout(4, 2)
    flat = torch.tensor([0.0, 0.5, -0.5, 0.3, -1.0, 0.2] + LOGITS_OUT)
    logits = layout.pad(flat).expand(samples, 4, 4)
    chosen = select_routes(
        logits, layout, RoutingMode.SAMPLE, temperature=torch.full((samples,), temperature)
    )
    assert torch.equal(chosen.sum(-1), torch.tensor([1, 2, 2, 2]).expand(samples, 4))
    assert not (chosen & ~layout.valid).any()
    counts = torch.stack([(chosen[:, 3, a] & chosen[:, 3, b]).sum() for a, b in PAIRS])
    assert counts.sum() == samples
    return counts.double() / samples


def _chi2(frequencies: torch.Tensor, probabilities: list[float], samples: int = 20_000) -> float:
    expected = torch.tensor(probabilities, dtype=torch.float64)
    return float(samples * ((frequencies - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_routes_follow_sampling_without_replacement(temperature: float) -> None:
    torch.manual_seed(0)
    frequencies = _sample_pairs(temperature)
    assert _chi2(frequencies, _pair_probabilities(LOGITS_OUT, temperature)) < CHI2_5DOF_P001
    # The same data reject the untempered distribution and the naive "k * p" inclusion
    # (with replacement), so the test can tell them apart.
    assert _chi2(frequencies, _pair_probabilities(LOGITS_OUT, 1.0)) > 10 * CHI2_5DOF_P001
    inclusion = torch.stack(
        [frequencies[[i for i, pair in enumerate(PAIRS) if j in pair]].sum() for j in range(4)]
    )
    weights = torch.tensor(LOGITS_OUT, dtype=torch.float64).div(temperature).softmax(0)
    assert (inclusion - 2 * weights).abs().max() > 0.05


def test_higher_route_temperature_gives_more_uniform_routes() -> None:
    torch.manual_seed(0)
    entropies = []
    for temperature in (0.25, 1.0, 4.0):
        frequencies = _sample_pairs(temperature)
        entropies.append(float(-(frequencies * frequencies.clamp_min(1e-12).log()).sum()))
    assert entropies[0] < entropies[1] < entropies[2] <= math.log(len(PAIRS))
    assert entropies[2] > 0.97 * math.log(len(PAIRS))


# --------------------------------------------------------------------------- behaviour


def test_behaviour_route_replays_the_collection_pass() -> None:
    net = small_net()
    net.route_temperature.fill_(5.0)  # sampled routes then differ from the top-k ones
    features, task_id = batch(64)
    net.eval()
    with torch.no_grad():
        with set_routing_mode("sample"):
            acted, _, path = net(features, task_id)
        with set_routing_mode("topk"):
            _, _, greedy = net(features, task_id)
        assert not torch.equal(path, greedy)
        with set_routing_mode("behaviour"):
            replayed, _, used = net(features, task_id, path)
    assert torch.equal(used, path) and torch.equal(replayed, acted)
    # The policy update replays it in training mode, with gradients and ResRouting.
    net.train()
    with set_routing_mode("behaviour"):
        replayed, _, used = net(features, task_id, path)
    assert torch.equal(used, path)
    torch.testing.assert_close(replayed, acted, rtol=1e-6, atol=1e-7)


def test_empty_behaviour_rows_fall_back_to_sampling() -> None:
    net = small_net()
    net.route_temperature.fill_(5.0)
    features, task_id = batch(64)
    with torch.no_grad(), set_routing_mode("sample"):
        _, _, path = net(features, task_id)
    stored = path.clone()
    stored[::2] = False  # no route recorded for the even rows
    routes = []
    with torch.no_grad(), set_routing_mode("behaviour"):
        for seed in (1, 2):
            torch.manual_seed(seed)
            routes.append(net(features, task_id, stored)[2])
    for route in routes:
        assert torch.equal(route[1::2], path[1::2])
        for g, chosen in enumerate(gates(route, net.num_modules)):
            assert (chosen.sum(-1) == min(net.top_k, g + 1)).all()
    assert not torch.equal(routes[0][::2], routes[1][::2])


def test_actor_replays_its_stored_path() -> None:
    torch.manual_seed(0)
    actor = make_actor("d2r", IN, Bounded(-1.0, 1.0, (2,)), TASKS, **SMALL)
    features, task_id = batch(16)
    data = TensorDict({"observation": features, "task_id": task_id[:, None]}, batch_size=[16])
    with set_routing_mode("sample"), torch.no_grad():
        acted = actor(data.clone())
    replay = acted.select("observation", "task_id", ("routing", "path"))
    with set_routing_mode("behaviour"), torch.no_grad():
        replayed = actor(replay)
    assert torch.equal(replayed["loc"], acted["loc"])
    assert torch.equal(replayed["scale"], acted["scale"])


# --------------------------------------------------------------------------- ResRouting


def reference_forward(
    net: D2RNetwork,
    features: torch.Tensor,
    task_id: torch.Tensor,
    route: torch.Tensor,
    res_routing: bool,
) -> torch.Tensor:
    """METHOD.md section 2 written out gate by gate and source by source."""
    n = net.num_modules
    state = net.state_encoder(features)
    one_hot = F.one_hot(task_id, net.num_tasks).to(state.dtype)
    embedding = one_hot @ net.task_embedding.weight.t() + net.task_embedding.bias
    logits = gates(net.router(embedding * state), n)
    chosen = gates(route, n)
    y = [torch.relu(net.first_module(torch.relu(state)))]
    y_bar = [y[0].detach()]
    for i in range(1, n + 1):  # gate i - 1: feeds module i (0-based), the head when i == n
        z, selected = logits[i - 1], chosen[i - 1]
        endorsed = (torch.softmax(z, -1) > 1.0 / (i + 1)).detach()
        weights = torch.softmax(z.masked_fill(~selected, float("-inf")), -1)
        x = sum(weights[:, j : j + 1] * y[j] for j in range(i))
        x_tilde = x
        if res_routing:
            m = endorsed.to(state.dtype)
            x_tilde = sum(
                weights[:, j : j + 1] * (m[:, j : j + 1] * y[j] + (1 - m[:, j : j + 1]) * y_bar[j])
                for j in range(i)
            )
        if i == n:
            return net.head(x_tilde)
        activation = torch.relu(F.linear(x_tilde, *module_parameters(dict(net.named_parameters()), i)))
        y.append(activation + x)
        y_bar.append(activation.detach() + x)
    raise AssertionError("unreachable")


def _gradients(
    net: nn.Module, output: torch.Tensor, direction: torch.Tensor
) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    (output * direction).sum().backward()
    return {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in net.named_parameters()
    }


def test_res_routing_keeps_forward_values() -> None:
    net = small_net()
    plain = copy.deepcopy(net)
    plain.res_routing = False
    features, task_id = batch(32)
    net.train()
    with set_routing_mode("topk"):
        with_grad = net(features, task_id)[0]
        with torch.no_grad():
            no_grad = net(features, task_id)[0]
        without = plain(features, task_id)[0]
    torch.testing.assert_close(with_grad, no_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(with_grad, without, rtol=1e-6, atol=1e-7)


# Forced gate logits for N = 4 (flat order: gate sizes 1, 2, 3, 4) and a behaviour route.
# softmax:  gate 1 [.88 .12] (threshold 1/3): endorses {0};  gate 2 [.05 .91 .05] (1/4):
# endorses {1};  output gate [.04 .04 .04 .87] (1/5): endorses {3}.
FORCED_LOGITS = [0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0]
FORCED_ROUTE = [1, 1, 1, 1, 1, 0, 0, 0, 1, 1]  # gate 2 reads {0, 1}; the head reads {2, 3}


def _forced_case() -> tuple[D2RNetwork, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = small_net(num_modules=4).double()
    with torch.no_grad():
        net.router[-1].weight.zero_()
        net.router[-1].bias.copy_(torch.tensor(FORCED_LOGITS))
    features, task_id = batch(8)
    route = torch.tensor(FORCED_ROUTE, dtype=torch.bool).expand(8, -1)
    return net, features.double(), task_id, route


def _random_case() -> tuple[D2RNetwork, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = small_net(num_modules=5, top_k=2).double()
    with torch.no_grad():
        net.router[-1].weight.mul_(20.0)  # spread the logits so that some sources are not endorsed
    net.route_temperature.fill_(20.0)
    features, task_id = batch(8)
    features = features.double()
    with torch.no_grad(), set_routing_mode("sample"):
        _, logits, route = net(features, task_id)
    # the case must exercise non-endorsed selected sources
    non_endorsed = [
        (route_g & ~(torch.softmax(z, -1) > 1.0 / (g + 2))).any()
        for g, (z, route_g) in enumerate(zip(gates(logits, 5), gates(route, 5)))
    ]
    assert any(non_endorsed)
    return net, features, task_id, route


def test_res_routing_cuts_non_endorsed_module_weights() -> None:
    net, features, task_id, route = _forced_case()
    net.train()
    direction = torch.randn(8, OUT, dtype=torch.float64)
    with set_routing_mode("behaviour"):
        grads = _gradients(net, net(features, task_id, route)[0], direction)
        plain = copy.deepcopy(net)
        plain.res_routing = False
        plain_grads = _gradients(plain, plain(features, task_id, route)[0], direction)
    # module 3 (0-based 2) is read only by the head, which does not endorse it. (The router's
    # last layer has zero weights here, so its earlier layers and the task embedding get no
    # gradient either; its last layer and the modules before module 3 do.)
    assert all(g.abs().max() == 0 for g in module_parameters(grads, 2))
    assert module_parameters(plain_grads, 2)[0].abs().max() > 0
    for j in (0, 1, 3):
        assert module_parameters(grads, j)[0].abs().max() > 0, f"module {j + 1}"
    for name in ("router.1.weight", "router.1.bias", "state_encoder.0.weight"):
        assert grads[name].abs().max() > 0, name


CASES = pytest.mark.parametrize("case", [_forced_case, _random_case], ids=["forced", "random"])


@CASES
@pytest.mark.parametrize("res_routing", [True, False])
def test_the_specification_follows_the_equations(case, res_routing: bool) -> None:
    """:mod:`~d2r_torchrl.modules.d2r_spec` (dense masks, stacked outputs) against METHOD.md
    written out source by source: outputs and every parameter's gradient, float64."""
    net, features, task_id, route = case()
    net.res_routing = res_routing
    net.train()
    direction = torch.randn(len(features), OUT, dtype=torch.float64)
    out = d2r_spec.network_forward(net, features, task_id, route)
    expected_out = reference_forward(net, features, task_id, route, res_routing)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    grads, expected = _gradients(net, out, direction), _gradients(net, expected_out, direction)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    if res_routing:  # ResRouting changed some gradient
        plain = _gradients(net, reference_forward(net, features, task_id, route, False), direction)
        assert any(not torch.allclose(plain[name], grads[name]) for name in grads)


@CASES
@pytest.mark.parametrize("res_routing", [True, False])
@pytest.mark.parametrize("chain", ["pytorch", "native"])
def test_gradients_match_a_gate_by_gate_implementation(case, res_routing: bool, chain: str) -> None:
    """The network's paths (routing slots and :class:`ModuleChain`, per gate or native)
    against the specification along the same behaviour route, float64."""
    net, features, task_id, route = case()
    net.res_routing = res_routing
    net.native_chain = chain == "native"
    net.train()
    direction = torch.randn(len(features), OUT, dtype=torch.float64)
    with set_routing_mode("behaviour"):
        out, _, replayed = net(features, task_id, route)
    assert torch.equal(replayed, route)
    grads = _gradients(net, out, direction)
    expected_out = d2r_spec.network_forward(net, features, task_id, route)
    expected = _gradients(net, expected_out, direction)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    if chain == "native":  # the extension was built (no fallback to the PyTorch path)
        assert load_native_chain() is not None


def test_the_specification_runs_under_vmap() -> None:
    """Twin networks through :func:`torch.vmap` of the specification equal each network."""
    nets = [small_net(seed) for seed in (0, 1)]
    features, task_id = batch(8)
    with torch.no_grad(), set_routing_mode("topk"):
        route = nets[0](features, task_id)[2]
    params = TensorDict.from_modules(*nets)

    def call(p: TensorDict) -> torch.Tensor:
        with p.to_module(nets[0]):
            return d2r_spec.network_forward(nets[0], features, task_id, route)

    stacked = torch.vmap(call)(params)
    for i, net in enumerate(nets):
        torch.testing.assert_close(stacked[i], d2r_spec.network_forward(net, features, task_id, route))


# --------------------------------------------------------------------------- TorchRL


def _critics(count: int, same: bool = False) -> list[nn.Module]:
    critics = []
    for i in range(count):
        torch.manual_seed(0 if same else i)
        critics.append(make_critic("d2r", IN, 2, TASKS, **SMALL))
    return critics


def _critic_input(n: int = 16) -> TensorDict:
    features, task_id = batch(n)
    action = torch.rand(n, 2) * 2 - 1
    return TensorDict({"observation": features, "action": action, "task_id": task_id}, [n])


def _ensemble(critics: list[nn.Module], data: TensorDict, randomness: str) -> torch.Tensor:
    params = TensorDict.from_modules(*critics)
    template = critics[0]

    def call(p: TensorDict, td: TensorDict) -> torch.Tensor:
        with p.to_module(template):
            return template(td)["state_action_value"]

    return torch.vmap(call, (0, None), randomness=randomness)(params, data)


def test_vmapped_critic_ensemble_matches_each_critic() -> None:
    critics = _critics(2)
    data = _critic_input()
    with set_routing_mode("topk"):
        ensemble = _ensemble(critics, data, "different")
        for i, critic in enumerate(critics):
            torch.testing.assert_close(ensemble[i], critic(data.clone())["state_action_value"])


def test_vmapped_ensemble_samples_routes_per_member() -> None:
    critics = _critics(2, same=True)
    for critic in critics:
        critic.network.route_temperature.fill_(5.0)
    data = _critic_input()
    with set_routing_mode("sample"):
        same = _ensemble(critics, data, "same")
        different = _ensemble(critics, data, "different")
    assert same.shape == different.shape == (2, 16, 1)
    assert torch.equal(same[0], same[1])
    assert not torch.equal(different[0], different[1])


def test_sac_loss_runs_with_d2r_actor_and_critics() -> None:
    from torchrl.objectives import SACLoss

    torch.manual_seed(0)
    spec = Bounded(-1.0, 1.0, (2,))
    actor = make_actor("d2r", IN, spec, TASKS, **SMALL)
    critic = make_critic("d2r", IN, 2, TASKS, **SMALL)
    loss = SACLoss(actor, critic, num_qvalue_nets=2, action_spec=spec)
    loss.set_vmap_randomness("different")
    n = 16
    features, task_id = batch(n)
    data = TensorDict(
        {
            "observation": features,
            "task_id": task_id,
            "action": torch.rand(n, 2) * 2 - 1,
            "next": {
                "observation": features + 0.1,
                "task_id": task_id,
                "reward": torch.randn(n, 1),
                "done": torch.zeros(n, 1, dtype=torch.bool),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        [n],
    )
    losses = loss(data)
    total = losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_alpha"]
    assert torch.isfinite(total)
    total.backward()
    grads = {name: p.grad for name, p in loss.named_parameters() if name != "log_alpha"}
    assert len(grads) == 2 * len(list(actor.parameters()))
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
    # every critic of the ensemble learns (first dimension = ensemble member); a given
    # module may be off every sampled route, so check the layers that always take part
    for part in ("state_encoder.0.weight", "router.1.weight", "head.weight"):
        grad = grads[f"qvalue_network_params.network.{part}"]
        assert (grad.flatten(1).abs().sum(1) > 0).all(), part


def test_compiles_without_graph_breaks() -> None:
    """A top-k forward, and a training step (behaviour route, ResRouting, backward).

    ``aot_eager`` traces like inductor (Dynamo graph + AOTAutograd) without the C++ build,
    which takes tens of seconds on 2 cores.
    """
    torch._dynamo.reset()
    net = small_net(num_modules=4)
    features, task_id = batch(8)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    net.eval()
    with set_routing_mode("topk"), torch.no_grad():
        expected, got = net(features, task_id), compiled(features, task_id)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[2], expected[2])

    net.train()
    with set_routing_mode("behaviour"):
        eager = _gradients(net, net(features, task_id, got[2])[0], torch.ones(8, OUT))
        traced = _gradients(net, compiled(features, task_id, got[2])[0], torch.ones(8, OUT))
    for name, grad in eager.items():
        torch.testing.assert_close(traced[name], grad, msg=name)


# --------------------------------------------------------------------------- input checks


def test_bad_inputs_raise_value_errors() -> None:
    net = small_net()
    features, task_id = batch(4)
    with pytest.raises(ValueError, match="width"):
        net(features[:, :-1], task_id)
    actor = make_actor("d2r", IN, Bounded(-1.0, 1.0, (2,)), TASKS, **SMALL)
    with pytest.raises(ValueError, match="width"):
        actor(TensorDict({"observation": features[:, :-1], "task_id": task_id}, [4]))
    for bad in (TASKS, -1):
        with pytest.raises(ValueError, match="task_id out of range"):
            actor(TensorDict({"observation": features, "task_id": torch.full((4,), bad)}, [4]))
    for top_k in (0, SMALL["num_modules"] + 1):
        with pytest.raises(ValueError, match="top_k"):
            small_net(top_k=top_k)
        with pytest.raises(ValueError, match="top_k"):
            make_actor("d2r", IN, Bounded(-1.0, 1.0, (2,)), TASKS, **{**SMALL, "top_k": top_k})


# --------------------------------------------------------------------------- weight import


class ReferenceStyleNet(nn.Module):
    """A stand-in with the reference ``DepthRouteNet`` attribute names, in top-k mode."""

    def __init__(self, state: int, tasks: int, out: int, modules: int, width: int, k: int,
                 hidden: tuple[int, int] = (400, 400), gate_hidden: tuple[int, int] = (256, 256)):
        super().__init__()
        self.k, self.num_modules, self.num_tasks = k, modules, tasks
        self.base = nn.Module()
        self.base.fc0 = nn.Linear(state, hidden[0])
        self.base.fc1 = nn.Linear(hidden[0], hidden[1])
        self.em_base = nn.Module()
        self.em_base.fc0 = nn.Linear(tasks, hidden[1])
        self.depth_route_net = nn.Module()
        self.depth_route_net.module_fcs = nn.ModuleList(
            [nn.Linear(hidden[1], width)] + [nn.Linear(width, width) for _ in range(modules - 1)]
        )
        self.depth_route_net.gates = nn.ModuleList(
            [nn.Linear(hidden[1], gate_hidden[0]), nn.Linear(gate_hidden[0], gate_hidden[1]),
             nn.Linear(gate_hidden[1], modules * (modules + 1) // 2)]
        )
        self.last = nn.Linear(width, out)
        self.gumbel_temperature = nn.Parameter(torch.rand(tasks) + 0.5)

    def forward(self, state: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        h = self.base.fc1(torch.relu(self.base.fc0(state)))
        e = self.em_base.fc0(F.one_hot(task_id, self.num_tasks).float())
        fc0, fc1, fc2 = self.depth_route_net.gates
        logits = fc2(torch.relu(fc1(torch.relu(fc0(e * h)))))
        chunk_weights = []
        for size, z in zip(range(1, self.num_modules + 1), gates(logits, self.num_modules)):
            top, index = z.topk(min(self.k, size), dim=-1)
            chunk_weights.append(torch.zeros_like(z).scatter(-1, index, torch.softmax(top, -1)))
        fcs = self.depth_route_net.module_fcs
        outputs = [torch.relu(fcs[0](torch.relu(h)))]
        for i in range(1, self.num_modules + 1):
            w = chunk_weights[i - 1]
            x = sum(w[:, j : j + 1] * outputs[j] for j in range(i))
            if i == self.num_modules:
                return self.last(x)
            outputs.append(torch.relu(fcs[i](x)) + x)
        raise AssertionError("unreachable")


def test_reference_mt10_policy_keys_and_outputs() -> None:
    torch.manual_seed(0)
    reference = ReferenceStyleNet(39, 10, 8, modules=16, width=128, k=2)
    state_dict = reference.state_dict()
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    assert shapes["gumbel_temperature"] == (10,)
    assert shapes["depth_route_net.gates.2.weight"] == (136, 256)
    assert shapes["depth_route_net.module_fcs.15.weight"] == (128, 128)
    assert sum(p.numel() for p in reference.parameters()) == 684_250
    net = load_reference_state_dict(state_dict)
    assert (net.num_modules, net.top_k, net.num_tasks, net.in_features) == (16, 2, 10, 39)
    assert torch.equal(net.route_temperature, reference.gumbel_temperature.detach())
    features = torch.randn(64, 39)
    task_id = torch.arange(64) % 10
    with set_routing_mode("topk"), torch.no_grad():
        torch.testing.assert_close(net(features, task_id)[0], reference(features, task_id))


def _small_reference() -> ReferenceStyleNet:
    torch.manual_seed(0)
    return ReferenceStyleNet(
        43, 3, 1, modules=5, width=32, k=3, hidden=(64, 48), gate_hidden=(40, 24)
    )


def test_reference_critic_with_other_sizes() -> None:
    reference = _small_reference()
    net = load_reference_state_dict(reference.state_dict(), top_k=3, res_routing=False)
    assert (net.num_modules, net.top_k, net.res_routing) == (5, 3, False)
    features = torch.randn(32, 43)
    task_id = torch.arange(32) % 3
    with set_routing_mode("topk"), torch.no_grad():
        torch.testing.assert_close(net(features, task_id)[0], reference(features, task_id))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda sd: sd.pop("last.bias"), "last.bias"),
        (lambda sd: sd.pop("depth_route_net.module_fcs.4.weight"),
         "depth_route_net.module_fcs.4.weight"),
        (lambda sd: sd.pop("em_base.fc0.weight"), "em_base.fc0.weight"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "extra"),
        (lambda sd: sd.update({"depth_route_net.module_fcs.5.weight": torch.zeros(32, 32)}),
         "depth_route_net.module_fcs.5.weight"),
        (lambda sd: sd.update({"depth_route_net.module_fcs.3.weight": torch.zeros(32, 31)}),
         "depth_route_net.module_fcs.3.weight"),
        (lambda sd: sd.update({"em_base.fc0.weight": torch.zeros(40, 3)}), "em_base.fc0.weight"),
        (lambda sd: sd.update({"gumbel_temperature": torch.ones(4)}), "gumbel_temperature"),
        (lambda sd: sd.update({"depth_route_net.gates.2.weight": torch.zeros(14, 24)}),
         "depth_route_net.gates.2.weight"),
    ],
    ids=["missing", "missing-module", "missing-embedding", "unexpected", "extra-module",
         "module-shape", "embedding-width", "temperatures", "not-triangular"],
)
def test_reference_import_rejects_bad_state_dicts(edit, key: str) -> None:
    state_dict = dict(_small_reference().state_dict())
    edit(state_dict)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_reference_state_dict(state_dict, top_k=3)


def test_state_dict_with_one_entry_per_module_loads() -> None:
    """Checkpoints of the per-module layout (``blocks.{i}.weight``/``bias``) load into the
    stacked parameters, module by module, and give the same outputs."""
    net = small_net(num_modules=5)
    per_module = {k: v for k, v in net.state_dict().items() if not k.startswith(("first_module", "module_"))}
    for name in ("weight", "bias"):
        per_module[f"blocks.0.{name}"] = net.state_dict()[f"first_module.{name}"]
        for i, tensor in enumerate(net.state_dict()[f"module_{name}"].unbind(0)):
            per_module[f"blocks.{i + 1}.{name}"] = tensor
    loaded = small_net(seed=1, num_modules=5)  # other weights until loaded
    loaded.load_state_dict(per_module)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    features, task_id = batch(6, seed=4)
    with set_routing_mode("topk"), torch.no_grad():
        assert torch.equal(loaded(features, task_id)[0], net(features, task_id)[0])
