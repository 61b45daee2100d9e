"""moe-worker and the gRPC protocol: real servers on 127.0.0.1, parity across placements, wire exactness."""
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeshard.coordinator.cluster import ClusterConfig, join_workers
from moeshard.coordinator.local_workers import LocalWorkers
from moeshard.coordinator.placement import ClusterError, ClusterSpec, plan_placement
from moeshard.coordinator.remote import WorkerClient
from moeshard.offload_core import ExpertKey, OffloadConfig, load_model
from moeshard.protos import expert_pb2 as pb
from moeshard.protos import expert_pb2_grpc as pb_grpc
from moeshard.protos.wire import WireError, WorkerInfo, tensor_from_pb, tensor_to_pb
from moeshard.worker.shard import ShardConfig

from .conftest import NUM_EXPERTS
from .workers import InProcessWorker

PROMPT = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9]])
LAYERS = 3
ALL_KEYS = [ExpertKey(layer, e) for layer in range(LAYERS) for e in range(NUM_EXPERTS)]


@pytest.fixture(scope="module")
def two_workers(tiny_ckpt):
    with LocalWorkers(2, tiny_ckpt, extra_args=("--slots-per-layer", "2")) as w:
        yield w.addresses


@pytest.fixture(scope="module")
def expected(tiny_ckpt, reference):
    ref = reference(tiny_ckpt)
    with torch.no_grad():
        logits = ref(PROMPT).logits
    return logits, ref.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, do_sample=False)


def _placements(a, b):
    half = {k: ((a,) if k.expert % 2 == 0 else (b,)) for k in ALL_KEYS if k.expert < NUM_EXPERTS // 2}
    return {
        "all-remote": {k: ((a,) if (k.layer + k.expert) % 2 else (b,)) for k in ALL_KEYS},
        "half-remote": half,
        "single-expert": {ExpertKey(1, 3): (a,)},
    }


@pytest.mark.slow  # two worker processes: ~12 s
@pytest.mark.parametrize("name", ["all-remote", "half-remote", "single-expert"])
def test_two_worker_processes_match_transformers(tiny_ckpt, two_workers, expected, name):
    ref_logits, ref_tokens = expected
    placement = _placements(*two_workers)[name]
    model = load_model(tiny_ckpt, slots_per_layer=2, prefetch=1)
    local_tokens = model.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    cluster = join_workers(model, ClusterConfig(ClusterSpec(tuple(two_workers), placement)))
    assert cluster.placement == placement
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, ref_logits, atol=1e-5, rtol=0)
    tokens = model.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(tokens, local_tokens)
    stats = model.stats().backends
    used = {owner for owners in placement.values() for owner in owners}
    for address in used:
        assert stats[address]["requests"] > 0 and stats[address]["bytes_sent"] > 0
        assert stats[address]["failures"] == 0
    model.close()


def test_balanced_placement_by_reported_memory():
    def info(experts_capacity):
        return WorkerInfo("f", frozenset(), "cpu", (experts_capacity + 6) * 100, 100, "0", 3, 8, 32, 2, "dense", 64)
    placement = plan_placement(ALL_KEYS, {"a:1": info(30), "b:1": info(10)})
    owners = [o for (o,) in placement.values()]
    assert owners.count("a:1") == 18 and owners.count("b:1") == 6  # 3:1 by capacity, all 24 placed
    for layer in range(LAYERS):  # every worker serves every layer
        assert {placement[ExpertKey(layer, e)] for e in range(NUM_EXPERTS)} == {("a:1",), ("b:1",)}
    small = plan_placement(ALL_KEYS, {"a:1": info(5)}, local_share=0.0)
    assert len(small) == 5  # the other 19 stay on the coordinator
    shared = plan_placement(ALL_KEYS, {"a:1": info(100)}, local_share=0.5)
    assert len(shared) == 12
    replicated = plan_placement(ALL_KEYS, {"a:1": info(30), "b:1": info(30), "c:1": info(30)}, replicas=2)
    assert len(replicated) == 24 and all(len(set(o)) == 2 for o in replicated.values())
    load = [sum(a in o for o in replicated.values()) for a in ("a:1", "b:1", "c:1")]
    assert load == [16, 16, 16]


def test_health_not_serving_then_serving(tiny_ckpt):
    with InProcessWorker(ShardConfig(model=tiny_ckpt), load=False) as w:
        channel = grpc.insecure_channel(w.address)
        stub = health_pb2_grpc.HealthStub(channel)
        check = lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        w.load()
        assert check() == health_pb2.HealthCheckResponse.SERVING
        reply = stub.Check(health_pb2.HealthCheckRequest(service="moeshard.v1.ExpertService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wire_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 33, generator=g).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -65504.0]).to(dtype)
    back = tensor_from_pb(tensor_to_pb(x), max_elements=10_000)
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.equal(back, x)
    assert back.contiguous().view(-1).view(torch.uint8).tolist() == x.contiguous().view(-1).view(torch.uint8).tolist()


def test_wire_rejects_inconsistent_tensors():
    good = tensor_to_pb(torch.zeros(2, 4))
    with pytest.raises(WireError, match="carries 32 bytes, expected 36"):
        tensor_from_pb(pb.Tensor(data=good.data, dtype="float32", shape=[3, 3]), max_elements=100)
    with pytest.raises(WireError, match="dtype 'int8' is not allowed"):
        tensor_from_pb(pb.Tensor(data=b"\0" * 8, dtype="int8", shape=[8]), max_elements=100)
    with pytest.raises(WireError, match="larger than the limit"):
        tensor_from_pb(pb.Tensor(data=b"", dtype="float32", shape=[1 << 20, 1 << 20]), max_elements=100)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remote_expert_output_equals_local_bit_for_bit(tiny_ckpt, dtype):
    with InProcessWorker(ShardConfig(model=tiny_ckpt, offload=OffloadConfig(dtype=dtype, store="ram"))) as w:
        shard = w.shard
        model = load_model(tiny_ckpt, dtype=dtype, slots_per_layer=2, prefetch=0)
        client = WorkerClient(w.address, model.fingerprint)
        client.assign([ExpertKey(2, 5), ExpertKey(2, 6)])
        hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
        _, future = client.run_experts_future(2, [5, 6], [3, 2], hidden)
        out = tensor_from_pb(future.result().output, max_elements=10_000)
        local = model.runtime.local.run(2, {5: hidden[:3], 6: hidden[3:]})
        assert out.dtype == hidden.dtype
        assert torch.equal(out, torch.cat([local[5], local[6]]))
        assert shard.stats().requests == 1
        client.close()


def test_unhosted_expert_is_not_found_and_fingerprint_is_checked(tiny_ckpt):
    with InProcessWorker(ShardConfig(model=tiny_ckpt)) as w:
        model = load_model(tiny_ckpt, prefetch=0)
        client = WorkerClient(w.address, model.fingerprint)
        assert client.assign([ExpertKey(0, 1)]) == client.assign([ExpertKey(0, 1)])  # idempotent
        assert client.info().hosted == frozenset({ExpertKey(0, 1)})
        _, future = client.run_experts_future(0, [2], [1], torch.zeros(1, 32))
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "expert (layer 0, expert 2) is not hosted" in err.value.details()

        stranger = WorkerClient(w.address, "0" * 32)
        with pytest.raises(grpc.RpcError) as err:
            stranger.assign([ExpertKey(0, 1)])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert w.shard.fingerprint in err.value.details() and "0" * 32 in err.value.details()
        # The worker keeps serving after refusals.
        _, future = client.run_experts_future(0, [1], [2], torch.ones(2, 32))
        assert future.result().output.shape == [2, 32]
        client.close()
        stranger.close()


def test_coordinator_refuses_a_worker_with_another_model(tiny_ckpt, tiny_sharded_ckpt):
    with InProcessWorker(ShardConfig(model=tiny_sharded_ckpt)) as w:
        model = load_model(tiny_ckpt, prefetch=0)
        with pytest.raises(ClusterError, match=f"worker {w.address} serves fingerprint .* but this coordinator has"):
            join_workers(model, ClusterConfig(ClusterSpec((w.address,))))


def test_a_worker_nobody_listens_for_starts_down_at_once(tiny_ckpt, expected):
    """Connection refused is known at once (not after the connect timeout); the worker starts down, its experts
    are computed by the coordinator, and the tokens are transformers'."""
    model = load_model(tiny_ckpt, prefetch=0)
    start = time.monotonic()
    cluster = join_workers(model, ClusterConfig(ClusterSpec(("127.0.0.1:9",)), connect_timeout_s=30.0))
    assert time.monotonic() - start < 5
    assert cluster.down == {"127.0.0.1:9"} and cluster.failures.get("127.0.0.1:9", 0) == 0
    assert cluster.describe()["127.0.0.1:9"]["state"] == "down" and "connection refused" in \
        cluster.describe()["127.0.0.1:9"]["detail"]
    assert torch.equal(model.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, do_sample=False), expected[1])
    model.close()
