"""The index form of routing (``[..., N, k]`` slots) against the plain mask form (``[..., N, N]``)."""
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
