"""The MoE layer's DISPATCH/COMBINE arithmetic on hand-made routing, through the real runtime and cluster."""
import torch
import torch.nn.functional as F

from moeshard.coordinator.cluster import Cluster, Unavailable
from moeshard.coordinator.remote import ClientConfig, RemoteExperts, WorkerClient
from moeshard.offload_core import ExpertKey, load_model
from moeshard.offload_core.moe_layer import _ATTR

# T = tokens, K = experts per token, D = hidden size


def _expert(ref, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of `layer` on x, from transformers' own fused parameters (the reference arithmetic)."""
    experts = ref.model.layers[layer].mlp.experts
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


def test_dropped_expert_is_zeroed_and_the_others_reweighted(tiny_ckpt, reference):
    """DROP: token 0 routes to (1, 3) with weights (0.7, 0.3) and expert 3 has no live worker; token 1 routes
    to (2, 5). Expected by hand: token 0 -> (0.7 + 0.3) * f1(x0), token 1 -> 0.6 f2(x1) + 0.4 f5(x1)."""
    ref = reference(tiny_ckpt)
    om = load_model(tiny_ckpt, slots_per_layer=2, prefetch=0)
    dead = "127.0.0.1:9"  # never called: it is down before the first step
    cluster = Cluster({dead: RemoteExperts(WorkerClient(dead, om.fingerprint, ClientConfig()), 32, 2)},
                      {ExpertKey(1, 3): (dead,)}, om.runtime.local, Unavailable.DROP, probe_max_s=60)
    om.runtime.join(cluster)
    cluster.mark_down(dead)
    layer = getattr(om.model.model.layers[1].mlp.experts, _ATTR)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))  # [T, D]
    index = torch.tensor([[1, 3], [2, 5]])  # [T, K]
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])  # [T, K]
    with torch.no_grad():
        out = layer(x, index, weights)
        expected = torch.stack([(0.7 + 0.3) * _expert(ref, 1, 1, x[0]),
                                0.6 * _expert(ref, 1, 2, x[1]) + 0.4 * _expert(ref, 1, 5, x[1])])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert cluster.failures[dead] == 1
    om.close()


def test_combine_equals_transformers_experts_on_the_same_routing(tiny_ckpt, reference):
    """No drop: the offloaded layer gives what transformers' experts module gives for the same routing."""
    ref = reference(tiny_ckpt)
    om = load_model(tiny_ckpt, slots_per_layer=1, prefetch=0)
    layer = getattr(om.model.model.layers[2].mlp.experts, _ATTR)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g)
    index = torch.randint(0, 8, (5, 2), generator=g)
    index[:, 1] = (index[:, 0] + 1 + torch.randint(0, 7, (5,), generator=g)) % 8  # distinct per token
    weights = torch.rand(5, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, index, weights), ref.model.layers[2].mlp.experts(x, index, weights),
                                   atol=1e-6, rtol=1e-5)
    om.close()
