"""Critic options: LayerNorm in the hidden layers, clipped TD targets, per-task reward scales."""
import pytest
import torch
from torchrl.data import Bounded

from d2r_torchrl.data.replay import random_transitions
from d2r_torchrl.modules.actor_critic import make_actor, make_critic
from d2r_torchrl.modules.routing import RoutingMode, set_routing_mode
from d2r_torchrl.objectives import MultiTaskSACLoss

OBS, ACT, TASKS = 5, 2, 2
TINY = {
    "d2r": dict(num_modules=3, module_width=8, encoder_widths=(16, 16), router_widths=(16,)),
    "soft_modular": dict(num_layers=2, num_modules=2, module_width=8, encoder_widths=(16, 16), gating_widths=(16,)),
    "mt_sac": dict(hidden_widths=(16, 16)),
    "mh_sac": dict(hidden_widths=(16, 16)),
}


def hidden_layers(network) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` of every hidden layer the option normalises, listed by hand."""
    encoder = getattr(network, "trunk", None) or network.state_encoder
    layers = [(m.weight, m.bias) for m in encoder if isinstance(m, torch.nn.Linear)]
    if hasattr(network, "first_module"):  # D2R: module 1, then modules 2..N stacked
        layers.append((network.first_module.weight, network.first_module.bias))
        layers += [(network.module_weight[g], network.module_bias[g]) for g in range(len(network.module_bias))]
    if hasattr(network, "layers"):  # Soft Modularization's modules
        layers += [(m.weight, m.bias) for layer in network.layers for m in layer]
    return layers


def critic_output(critic, features, task_id):
    network = critic.network
    with torch.no_grad():
        out = network(features, task_id)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("architecture", list(TINY))
def test_layer_norm_makes_each_hidden_layer_scale_free(architecture):
    """``LN(c z) = LN(z)`` for ``c > 0``: with the option, scaling any one hidden layer's weight
    and bias by 3 leaves ``Q`` unchanged; without it, it changes ``Q``."""
    features, task_id = torch.randn(6, OBS + ACT), torch.arange(6) % TASKS
    for layer_norm in (True, False):
        torch.manual_seed(0)
        critic = make_critic(architecture, OBS, ACT, TASKS, layer_norm=layer_norm, **TINY[architecture])
        with set_routing_mode(RoutingMode.TOPK):
            base = critic_output(critic, features, task_id)
            changed = []
            for weight, bias in hidden_layers(critic.network):
                with torch.no_grad():
                    weight.mul_(3.0), bias.mul_(3.0)
                changed.append(not torch.allclose(critic_output(critic, features, task_id), base, rtol=1e-4, atol=1e-5))
                with torch.no_grad():
                    weight.div_(3.0), bias.div_(3.0)
        assert len(changed) >= 2
        assert not any(changed) if layer_norm else any(changed), (layer_norm, changed)


def test_layer_norm_off_keeps_the_reference_parameters():
    for architecture, sizes in TINY.items():
        keys = make_critic(architecture, OBS, ACT, TASKS, **sizes).state_dict().keys()
        assert not [key for key in keys if "norm" in key], architecture


def test_d2r_layer_norm_critic_trains_under_the_loss_on_either_chain_setting():
    """The twin critics run under ``torch.vmap``; with LayerNorm D2R takes the plain-autograd
    chain whatever ``native_chain`` says, so both settings give the same losses and gradients."""
    spec = Bounded(-1.0, 1.0, (ACT,))
    results = []
    for native in (True, False):
        torch.manual_seed(0)
        actor = make_actor("d2r", OBS, spec, TASKS, native_chain=native, **TINY["d2r"])
        critic = make_critic("d2r", OBS, ACT, TASKS, layer_norm=True, native_chain=native, **TINY["d2r"])
        loss = MultiTaskSACLoss(actor, critic, num_tasks=TASKS)
        loss.make_value_estimator(gamma=0.9)
        batch = random_transitions(actor, TASKS, 8, OBS, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(1)
        out = loss(batch)
        out["loss_qvalue"].backward()
        gain = loss.qvalue_network_params["network", "module_norm_weight"]
        results.append((out["loss_qvalue"].detach(), gain.grad.clone()))
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
