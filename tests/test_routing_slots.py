"""The index form of routing (``[..., N, k]`` slots) against the plain mask form (``[..., N, N]``)."""
import warnings

import pytest
import torch

from d2r_torchrl.modules.routing import (
    GateLayout,
    RoutingMode,
    endorsement_mask,
    route_mask,
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


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_top_k_picks_the_torch_columns(k: int, dtype: torch.dtype) -> None:
    """The native top-k against ``torch.topk`` + sort on padded logits (``-inf`` past each
    gate's candidates), with a NaN, vmapped, and on 0/1 behaviour scores. Gates with fewer
    than ``k`` candidates fill their padding slots with distinct invalid columns, which
    ``torch.topk`` picks among the tied ``-inf`` in no set order: those slots must be
    invalid, and equal once clamped to the gate's last candidate (as the chain reads them)."""
    from d2r_torchrl.modules.routing import _topk_index

    torch.manual_seed(2)
    layout = GateLayout(num_modules=7, top_k=k)
    logits = layout.pad(torch.randn(64, layout.num_logits, dtype=dtype))
    logits[3, 4, 1] = float("nan")  # torch.topk ranks NaN first

    def assert_same_sources(native: torch.Tensor, expected: torch.Tensor) -> None:
        assert native.dtype == torch.long and native.shape == expected.shape
        invalid = native > torch.arange(7).view(7, 1)
        assert torch.equal(invalid, ~layout.slot_valid.expand_as(invalid))
        assert (native.diff(dim=-1) > 0).all()  # distinct, ascending
        clamp = layout.last_source
        assert torch.equal(torch.minimum(native, clamp), torch.minimum(expected, clamp))

    expected = _topk_index(logits, k)
    assert_same_sources(_topk_index(logits, k, native=True), expected)
    vmapped = torch.vmap(lambda z: _topk_index(z, k, native=True))(logits.view(4, 16, 7, 7))
    assert_same_sources(vmapped.view(64, 7, k), expected)
    stored = layout.pad(layout.flatten(route_mask(expected, layout)), fill=False).to(dtype)
    assert_same_sources(_topk_index(stored, k, native=True), expected)
