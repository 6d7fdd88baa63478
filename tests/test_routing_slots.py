"""The index form of routing (``[..., N, k]`` slots) against the plain mask form (``[..., N, N]``)."""
import warnings

import pytest
import torch

from d2r_torchrl.modules.routing import (
    GateLayout,
    RoutingMode,
    endorsement_mask,
    route_mask,
    route_slots,
    route_weights,
    select_sources,
    slot_endorsement,
    slot_weights,
)


@pytest.mark.parametrize("mode", [RoutingMode.TOPK, RoutingMode.SAMPLE])
def test_slot_weights_and_endorsement_equal_the_mask_forms(mode: RoutingMode) -> None:
    torch.manual_seed(0)
    layout = GateLayout(num_modules=6, top_k=2)
    logits = layout.pad(3 * torch.randn(32, layout.num_logits))
    index = select_sources(logits, layout, mode, temperature=torch.full((32,), 2.0))
    selected = route_mask(index, layout)
    assert (selected.sum(-1) == torch.minimum(torch.arange(1, 7), torch.tensor(2))).all()
    slots = torch.minimum(index, layout.last_source)  # padding slots read a computed module
    dense_weights = route_weights(logits, selected).gather(-1, slots) * layout.slot_valid
    torch.testing.assert_close(slot_weights(logits, index, layout), dense_weights)
    dense_endorsed = endorsement_mask(logits, layout).gather(-1, slots) & layout.slot_valid
    assert torch.equal(slot_endorsement(logits, index, layout), dense_endorsed)


def test_replayed_route_gives_the_same_slots() -> None:
    torch.manual_seed(1)
    layout = GateLayout(num_modules=5, top_k=2)
    logits = layout.pad(torch.randn(16, layout.num_logits))
    sampled = select_sources(logits, layout, RoutingMode.SAMPLE, temperature=torch.full((16,), 5.0))
    stored = layout.flatten(route_mask(sampled, layout))
    replayed = select_sources(logits, layout, RoutingMode.BEHAVIOUR, torch.ones(16), stored)
    assert torch.equal(replayed * layout.slot_valid, sampled * layout.slot_valid)


def test_pad_and_flatten_follow_the_gate_order() -> None:
    """Three modules: logits ``[z2 | z3 z3' | zo zo' zo'']`` fill the lower triangle row by row,
    and gradients flow back to the flat logits they came from."""
    layout = GateLayout(num_modules=3, top_k=2)
    flat = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], requires_grad=True)
    inf = float("inf")
    padded = layout.pad(flat)
    assert torch.equal(padded.detach(), torch.tensor([[[1.0, -inf, -inf], [2.0, 3.0, -inf], [4.0, 5.0, 6.0]]]))
    assert torch.equal(layout.flatten(padded).detach(), flat.detach())
    padded.masked_fill(~layout.valid, 0.0).mul(torch.arange(9.0).view(3, 3)).sum().backward()
    assert torch.equal(flat.grad, torch.tensor([[0.0, 3.0, 4.0, 6.0, 7.0, 8.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-sample fallback under vmap (twin critics are vmapped)
        assert torch.equal(torch.vmap(layout.pad)(flat.detach().expand(2, 6)), padded.detach().expand(2, 3, 3))
    routes = layout.pad(torch.tensor([True, False, True, True, False, True]), fill=False)
    assert routes.tolist() == [[True, False, False], [False, True, False], [True, False, True]]


@pytest.mark.parametrize("mode", list(RoutingMode))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_route_slots_equal_the_plain_form(mode: RoutingMode, k: int, dtype: torch.dtype) -> None:
    """The extension's routing pass against the plain form on padded logits
    (:func:`select_sources`, :func:`slot_weights`, :func:`slot_endorsement`,
    :func:`route_mask`): the same sources, endorsement and route, and the same weights and
    weight gradients; also vmapped, as the twin critics call it (with batched and with
    shared temperatures). The Gumbel noise is drawn before either form runs, so one seed
    gives both the same draws. Gates 0 and 1 have fewer candidates than ``k = 3`` (padding
    slots); in top-k mode one logit is NaN (it ranks first, as in ``torch.topk``, and its
    gate's weights are NaN in both forms)."""
    torch.manual_seed(2)
    layout = GateLayout(num_modules=7, top_k=k)
    rows = 48
    flat = 3 * torch.randn(rows, layout.num_logits, dtype=dtype)
    if mode is RoutingMode.TOPK:
        flat[5, 12] = float("nan")
    flat.requires_grad_()
    temperature = torch.rand(rows, dtype=dtype) + 0.5
    direction = torch.randn(rows, 7, k, dtype=dtype)
    behaviour = None
    if mode is RoutingMode.BEHAVIOUR:
        behaviour = route_slots(flat, layout, RoutingMode.SAMPLE, temperature).route
        behaviour[::3] = False  # rows without a stored route sample instead

    def run(native: bool, vmapped: bool, shared_temperature: bool = False) -> list[torch.Tensor]:
        """Both forms on the same draws; vmapped over 4 groups of rows, where
        ``shared_temperature`` gives every group the first group's temperatures (unbatched)."""

        def routes(logits, temperature, behaviour):
            return route_slots(logits, layout, mode, temperature, behaviour, endorse=True, native=native)

        shape = (4, rows // 4) if vmapped else (rows,)
        temperatures = temperature.view(shape)
        if vmapped:
            if shared_temperature:
                temperatures = temperatures[0]
            in_dims = (0, None if shared_temperature else 0, None if behaviour is None else 0)
            routes = torch.vmap(routes, in_dims=in_dims, randomness="different")
        torch.manual_seed(5)
        slots = routes(flat.view(*shape, -1), temperatures, None if behaviour is None else behaviour.view(*shape, -1))
        (grad,) = torch.autograd.grad((slots.weights.reshape(rows, 7, k) * direction).nansum(), flat)
        return [t.reshape(rows, *t.shape[len(shape):]) for t in slots] + [grad]

    for vmapped, shared_temperature in ((False, False), (True, False), (True, True)):
        sources, weights, endorsed, route, grad = run(True, vmapped, shared_temperature)
        expected = run(False, vmapped, shared_temperature)
        assert sources.dtype == torch.long and torch.equal(sources, expected[0])
        assert (sources <= torch.arange(7).view(7, 1)).all()
        torch.testing.assert_close(weights, expected[1], equal_nan=True)
        assert torch.equal(endorsed, expected[2]) and torch.equal(route, expected[3])
        torch.testing.assert_close(grad, expected[4], equal_nan=True)
