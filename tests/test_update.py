"""The update step: the compiled update equals the eager one; no host synchronisation."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.objectives import SoftUpdate

from d2r_torchrl.data.replay import random_transitions
from d2r_torchrl.modules import make_actor, make_critic
from d2r_torchrl.objectives import MultiTaskSACLoss
from d2r_torchrl.training.update import NonFiniteLossError, check_finite, make_update

TASKS, OBS, ACT, BATCH = 3, 5, 2, 12
SMALL = {
    "d2r": dict(num_modules=4, module_width=8, top_k=2, encoder_widths=(16, 12), router_widths=(10,)),
    "mt_sac": dict(hidden_widths=(16, 16)),
}


def build(architecture: str) -> tuple[MultiTaskSACLoss, dict, SoftUpdate]:
    torch.manual_seed(0)
    spec = Bounded(-1.0, 1.0, (ACT,))
    actor = make_actor(architecture, OBS, spec, TASKS, **SMALL[architecture])
    critic = make_critic(architecture, OBS, ACT, TASKS, **SMALL[architecture])
    loss = MultiTaskSACLoss(actor, critic, num_tasks=TASKS, deactivate_vmap=True)
    loss.make_value_estimator(gamma=0.99)
    optimizers = {
        "actor": torch.optim.Adam(loss.actor_network_params.values(True, True), lr=1e-2),
        "critic": torch.optim.Adam(loss.qvalue_network_params.values(True, True), lr=1e-2),
        "alpha": torch.optim.Adam([loss.log_alpha], lr=1e-2),
    }
    return loss, optimizers, SoftUpdate(loss, tau=0.1)


def fixed_batch(loss: MultiTaskSACLoss) -> TensorDict:
    return random_transitions(loss.actor_network, TASKS, BATCH, OBS, generator=torch.Generator().manual_seed(1))


def run_updates(architecture: str, compile: bool, steps: int = 5, warmup: int = 2) -> tuple[list, MultiTaskSACLoss]:
    """``steps`` updates on one fixed batch; a compiled update may compile only during the
    first ``warmup`` calls (one compile per optimiser, one for the routing state the first
    call leaves behind), and any later recompile raises."""
    loss, optimizers, updater = build(architecture)
    batch = fixed_batch(loss)
    update = make_update(loss, optimizers, updater, compile=compile, backend="aot_eager")
    torch.manual_seed(7)
    history = [update(batch.clone()) for _ in range(warmup)]
    with torch._dynamo.config.patch(error_on_recompile=compile):
        history += [update(batch.clone()) for _ in range(steps - warmup)]
    return history, loss


@pytest.mark.parametrize("architecture", ["d2r", "mt_sac"])
def test_compiled_update_matches_eager_and_stops_recompiling(architecture: str) -> None:
    """``torch.compile(fullgraph=True)`` of the loss (AOTAutograd tracing; ``aot_eager``
    skips the C++ build of inductor) gives the eager losses and parameters over five
    updates, and recompiles nothing after the first two. ``fullgraph=True`` also proves
    that the loss and its backward read nothing on the host (a ``.item()`` would break the
    graph and fail the compile)."""
    torch._dynamo.reset()
    eager, eager_loss = run_updates(architecture, compile=False)
    compiled, compiled_loss = run_updates(architecture, compile=True)
    for step, (expected, got) in enumerate(zip(eager, compiled)):
        for key in ("loss_actor", "loss_qvalue", "loss_alpha", "td_error"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{key} at {step}")
    expected_params = eager_loss.state_dict()
    for name, value in compiled_loss.state_dict().items():
        torch.testing.assert_close(value, expected_params[name], rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.equal(compiled_loss.log_alpha, torch.zeros(TASKS)), "the updates changed the parameters"


def test_check_finite_names_the_losses() -> None:
    losses = TensorDict(loss_actor=torch.tensor(1.0), loss_qvalue=torch.tensor(float("nan")), loss_alpha=torch.tensor(0.0))
    with pytest.raises(NonFiniteLossError, match="loss_qvalue"):
        check_finite(losses)
    check_finite(losses.apply(torch.nan_to_num))
