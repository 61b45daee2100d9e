"""The worker's gRPC door under attack (loopback only, bounded loops): a client without the token gets a
refusal and nothing else (no call slot, no memory, no log it controls); big or echoing requests get clean
INVALID_ARGUMENTs; health answers under any load; activations that overflow are an error naming the expert.
Issue 22: a message larger than the model can need is refused unparsed, and the bytes held at once are bounded;
a refused model switch keeps the model being served; a description is checked before anything is built from it.
(What a worker receives and keeps on disk is tested in test_worker_hardening_disk.py.)"""
import re
import threading
import time

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeshard.coordinator.cluster import ClusterConfig, WorkerRefused, join_workers
from moeshard.coordinator.local_workers import LocalWorkers
from moeshard.coordinator.placement import ClusterSpec
from moeshard.coordinator.remote import ClientConfig, WorkerClient
from moeshard.offload_core import ExpertKey, load_model
from moeshard.offload_core.experts import NonFiniteOutput
from moeshard.offload_core.moe_layer import _ATTR
from moeshard.protos import expert_pb2 as pb
from moeshard.protos import expert_pb2_grpc as pb_grpc
from moeshard.protos.wire import AUTH_METADATA_KEY, bearer, tensor_to_pb
from moeshard.worker.server import ServerConfig
from moeshard.worker.shard import ShardConfig

from .workers import InProcessWorker

TOKEN = "t0ken-for-tests"
AUTH = ((AUTH_METADATA_KEY, bearer(TOKEN)),)
RUN = "/moeshard.v1.ExpertService/RunExperts"
D = 32


def _raw(channel, method=RUN):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


@pytest.fixture(scope="module")
def process_worker(tiny_ckpt, tmp_path_factory):
    """A real moe-worker process with a token, its log in a file, its RSS measurable on its own."""
    logs = tmp_path_factory.mktemp("worker-logs")
    with LocalWorkers(1, tiny_ckpt, extra_args=("--token", TOKEN), log_dir=logs) as workers:
        yield workers.addresses[0], psutil.Process(workers.procs[0].pid), logs / "worker0.log"


@pytest.fixture()
def token_worker(tiny_ckpt):
    cfg = ServerConfig(listen="127.0.0.1:0", grace_s=1.0, token=TOKEN, message_timeout_s=1.0, max_inflight=8)
    with InProcessWorker(ShardConfig(model=tiny_ckpt), server_cfg=cfg) as w:
        yield w


def _health_ok(channel, metadata=AUTH, timeout=5.0) -> float:
    """Seconds a health check took; fails unless it answered SERVING."""
    start = time.monotonic()
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                                                      metadata=metadata)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - start


def _silent(never: threading.Event):
    """A request stream that sends headers and then nothing until `never` is set."""
    never.wait(30)
    return
    yield  # pragma: no cover


def test_unauthenticated_calls_that_never_send_their_message_hold_no_slot(token_worker, tiny_ckpt):
    """70 calls without the token send headers and never a message (more than the 8 in-flight slots): each is
    refused at once, and the coordinator's own calls and health checks go through meanwhile."""
    channel = grpc.insecure_channel(token_worker.address)
    never = threading.Event()

    hanging = [channel.stream_unary(RUN, request_serializer=None, response_deserializer=None).future(_silent(never))
               for _ in range(70)]
    try:
        for call in hanging:
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        om = load_model(tiny_ckpt, prefetch=0)
        client = WorkerClient(token_worker.address, om.fingerprint, ClientConfig(token=TOKEN, rpc_timeout_s=5))
        assert client.info().fingerprint == om.fingerprint and client.is_serving()
        client.assign([ExpertKey(0, 1)])
        _, future = client.run_experts_future(0, [1], [2], torch.ones(2, D))
        assert future.result().output.shape == [2, D]
        client.close()
        om.close()
    finally:
        never.set()
        channel.close()


def test_an_authenticated_call_whose_message_never_arrives_is_dropped(token_worker):
    channel = grpc.insecure_channel(token_worker.address)
    never = threading.Event()

    start = time.monotonic()
    call = channel.stream_unary(RUN, request_serializer=None, response_deserializer=None).future(_silent(never),
                                                                                              metadata=AUTH)
    with pytest.raises(grpc.RpcError) as err:
        call.result(timeout=10)
    never.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within 1 s" in err.value.details() and time.monotonic() - start < 5
    channel.close()


def _sample_peak(proc: psutil.Process, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        out[0] = max(out[0], proc.memory_info().rss)
        time.sleep(0.005)


@pytest.mark.slow  # 3 rounds of 16 concurrent 60 MiB messages
def test_unauthenticated_big_messages_cost_the_worker_no_memory(process_worker):
    address, proc, _ = process_worker
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    send = _raw(channel)
    big, zeros = b"\x5a" * (60 << 20), bytes(60 << 20)  # a 60 MiB message, and one that gzips to 61 KB
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()
    sampler = threading.Thread(target=_sample_peak, args=(proc, stop, peak), daemon=True)
    sampler.start()
    try:
        for _ in range(3):
            futures = [send.future(big, timeout=30) for _ in range(8)]
            futures += [send.future(zeros, timeout=30, compression=grpc.Compression.Gzip) for _ in range(8)]
            for f in futures:
                with pytest.raises(grpc.RpcError) as err:
                    f.result()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop.set()
        sampler.join()
        channel.close()
    growth = peak[0] - base
    assert growth < 32 << 20, f"the worker's RSS peaked {growth / 2**20:.1f} MiB above its start"
    assert _health_ok(grpc.insecure_channel(address)) < 2


@pytest.mark.slow  # a worker process
def test_refusals_are_logged_quoted_short_and_rarely(process_worker):
    address, _, log = process_worker
    before = log.stat().st_size
    channel = grpc.insecure_channel(address)
    forged = "/x\n2026-01-01 00:00:00 WARNING forged: all is well"
    for method in [forged] + ["/" + "m" * 6000] * 200:  # 6 KB names: under gRPC's own 8 KiB metadata limit
        with pytest.raises(grpc.RpcError) as err:
            _raw(channel, method)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    time.sleep(0.3)
    written = log.read_text(errors="replace")[before:]
    assert len(written) < 4096, f"{len(written)} bytes of log for 201 refusals"
    assert not re.search(r"^2026-01-01 00:00:00 WARNING forged", written, re.M)
    refusals = [line for line in written.splitlines() if "refused a call" in line]
    assert len(refusals) <= 2 and all(len(line) < 400 for line in refusals), refusals


def test_a_refusal_log_line_quotes_and_cuts_the_method(token_worker, caplog):
    channel = grpc.insecure_channel(token_worker.address)
    with caplog.at_level("WARNING", logger="moeshard.worker.auth"):
        with pytest.raises(grpc.RpcError):
            _raw(channel, "/x\nFORGED " + "y" * 5000)(b"", timeout=5)
    channel.close()
    (record,) = [r for r in caplog.records if "refused a call" in r.getMessage()]
    message = record.getMessage()
    assert "\n" not in message and "'/x\\nFORGED" in message and len(message) < 300


@pytest.mark.parametrize("field, value", [
    ("fingerprint", "f" * 100_000), ("dtype", "d" * 10_000), ("experts", list(range(8)) * 1250),
    ("shape", [1] * 10_000)])
def test_errors_never_echo_unbounded_input(token_worker, field, value):
    fingerprint = token_worker.shard.fingerprint
    hidden = tensor_to_pb(torch.zeros(1, D))
    req = pb.RunExpertsRequest(fingerprint=fingerprint, layer=0, experts=[0], counts=[1], hidden=hidden)
    if field == "fingerprint":
        req.fingerprint = value
    elif field == "dtype":
        req.hidden.dtype = value
    elif field == "experts":
        del req.experts[:]
        req.experts.extend(value)
        req.counts.extend([1] * (len(value) - 1))
    else:
        del req.hidden.shape[:]
        req.hidden.shape.extend(value)
    channel = grpc.insecure_channel(token_worker.address)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.ExpertServiceStub(channel).RunExperts(req, timeout=10, metadata=AUTH)
    expected = grpc.StatusCode.FAILED_PRECONDITION if field == "fingerprint" else grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.code() == expected, err.value.details()[:200]
    assert len(err.value.details()) <= 600
    channel.close()


def _repeated(tag: int, item: bytes, count: int) -> bytes:
    """A serialized repeated field of `count` copies of `item` (built as bytes: no Python objects)."""
    return (bytes([tag]) + _varint(len(item)) + item) * count


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_huge_id_lists_are_refused_without_stalling_health(token_worker):
    fingerprint = pb.AssignRequest(fingerprint=token_worker.shard.fingerprint).SerializeToString()
    assign = fingerprint + _repeated(0x12, b"\x08\x00\x10\x01", 2_000_000)  # 2M ExpertId{layer 0, expert 1}
    prefetch = fingerprint + b"\x10\x00" + b"\x1a" + _varint(10_000_000) + b"\x01" * 10_000_000  # 10M packed ids
    channel = grpc.insecure_channel(token_worker.address, options=[("grpc.max_send_message_length", -1)])
    results, worst = {}, [0.0]

    def call(name, method, payload):
        try:
            _raw(channel, method)(payload, timeout=30, metadata=AUTH)
            results[name] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            results[name] = (err.code(), err.details())

    threads = [threading.Thread(target=call, args=("assign", "/moeshard.v1.ExpertService/Assign", assign)),
               threading.Thread(target=call, args=("prefetch", "/moeshard.v1.ExpertService/Prefetch", prefetch))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        worst[0] = max(worst[0], _health_ok(channel))
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=30)
    assert results["assign"][0] == grpc.StatusCode.INVALID_ARGUMENT and "expected at most" in results["assign"][1]
    assert results["prefetch"] == grpc.StatusCode.OK  # a hint is never an error: cut to a layer's worth
    assert worst[0] < 1.0, f"a health check took {worst[0]:.2f} s while the lists were handled"
    channel.close()


def test_health_answers_under_any_load(token_worker):
    """100 concurrent callers of RunExperts on a worker that admits 8 at once: every health check is SERVING."""
    channel = grpc.insecure_channel(token_worker.address)
    stub = pb_grpc.ExpertServiceStub(channel)
    client = WorkerClient(token_worker.address, token_worker.shard.fingerprint, ClientConfig(token=TOKEN))
    client.assign([ExpertKey(1, e) for e in range(8)])
    req = pb.RunExpertsRequest(fingerprint=token_worker.shard.fingerprint, layer=1, experts=list(range(8)),
                               counts=[64] * 8, hidden=tensor_to_pb(torch.randn(512, D)))
    calls = [stub.RunExperts.future(req, timeout=60, metadata=AUTH) for _ in range(100)]
    health = [_health_ok(channel) for _ in range(85)]
    codes = []
    for c in calls:
        try:
            c.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED} and grpc.StatusCode.OK in codes
    assert max(health) < 2.0
    client.close()
    channel.close()


def test_overflowing_activations_are_an_error_naming_layer_and_expert(token_worker, tiny_ckpt):
    big = torch.full((3, D), 1e30)
    client = WorkerClient(token_worker.address, token_worker.shard.fingerprint, ClientConfig(token=TOKEN))
    client.assign([ExpertKey(2, 4)])
    _, future = client.run_experts_future(2, [4], [3], big)
    with pytest.raises(grpc.RpcError) as err:
        future.result()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("layer 2: expert 4 produced NaN or Inf")
    client.close()
    # The coordinator: a worker's refusal is an error for the step, not a failure to route around; its own
    # experts are checked the same way.
    om = load_model(tiny_ckpt, slots_per_layer=2, prefetch=0)
    cluster = join_workers(om, ClusterConfig(ClusterSpec((token_worker.address,), {ExpertKey(2, 4): (token_worker.address,)}),
                                             ClientConfig(token=TOKEN)))
    layer = getattr(om.model.model.layers[2].mlp.experts, _ATTR)
    with torch.no_grad(), pytest.raises(WorkerRefused, match=r"layer 2: expert 4 produced NaN or Inf"):
        layer(big, torch.tensor([[4, 5]] * 3), torch.full((3, 2), 0.5))
    assert not cluster.down and not cluster.failures
    with torch.no_grad(), pytest.raises(NonFiniteOutput, match=r"layer 2: expert 5, expert 6 produced NaN or Inf"):
        layer(big, torch.tensor([[5, 6]] * 3), torch.full((3, 2), 0.5))
    om.close()


# -- issue 22: large messages (item 11), model switches (item 9), descriptions (item 12) ------------------------

def _request_failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_run_experts_larger_than_the_model_can_need_is_refused_unparsed(token_worker):
    """max_tokens 8192 x hidden 32 x 4 bytes: about 1 MiB. A 2 MiB request is refused from its size alone, as a
    unary call and on the session stream, with what was expected."""
    fingerprint = token_worker.shard.fingerprint
    big = torch.zeros(16384, D)
    for stream in (False, True):
        client = WorkerClient(token_worker.address, fingerprint, ClientConfig(token=TOKEN, stream=stream))
        client.assign([ExpertKey(0, 1)])
        _, future = client.run_experts_future(0, [1], [16384], big)
        err = _request_failure(lambda: client.result(future))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        method = "Session" if stream else "RunExperts"
        assert err.details().startswith(f"{method} message of 2.0 MiB: expected at most 1.0 MiB (8192 rows x 32 "
                                        "hidden x 4 bytes"), err.details()
        _, future = client.run_experts_future(0, [1], [2], torch.ones(2, D))  # and the next request is served
        assert client.result(future).output.shape == [2, D]
        client.close()


def test_messages_held_at_once_and_sessions_are_bounded(tiny_ckpt):
    """A budget of 1 MiB of messages, the largest message 1 MiB: while one call's message is being read, another
    is refused at once (RESOURCE_EXHAUSTED, nothing read); health answers; once the slow call is dropped, calls
    go through. A second session past max_sessions is refused the same way."""
    cfg = ServerConfig(listen="127.0.0.1:0", grace_s=1.0, token=TOKEN, message_timeout_s=0.5,
                       message_memory_bytes=1 << 20, max_sessions=1)
    with InProcessWorker(ShardConfig(model=tiny_ckpt), server_cfg=cfg, max_receive_bytes=1 << 20) as w:
        client = WorkerClient(w.address, w.shard.fingerprint, ClientConfig(token=TOKEN, stream=False))
        client.assign([ExpertKey(0, 1)])
        channel = grpc.insecure_channel(w.address)
        never = threading.Event()
        slow = channel.stream_unary(RUN, request_serializer=None, response_deserializer=None).future(
            _silent(never), metadata=AUTH)
        time.sleep(0.2)
        _, future = client.run_experts_future(0, [1], [2], torch.ones(2, D))
        err = _request_failure(future.result)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details().startswith("worker busy"), \
            err.details()
        assert _health_ok(channel) < 2
        assert _request_failure(slow.result).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        never.set()
        _, future = client.run_experts_future(0, [1], [2], torch.ones(2, D))
        assert future.result().output.shape == [2, D]
        sessions = [WorkerClient(w.address, w.shard.fingerprint, ClientConfig(token=TOKEN)) for _ in range(2)]
        assert sessions[0].session().ping().result(timeout=5) is not None
        err = _request_failure(lambda: sessions[1].session().ping().result(timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions open (limit 1)" in err.details()
        for c in (client, *sessions):
            c.close()
        channel.close()


@pytest.mark.slow  # 3 rounds of 16 concurrent 60 MiB messages
def test_big_authenticated_messages_are_refused_within_a_memory_bound(process_worker):
    """Issue 22.11: 16 concurrent authenticated 60 MiB RunExperts, refused after parsing, took a worker from
    405 MiB to 9.3 GiB (4.5 GiB more on 2 CPU cores). Now each is refused from its size, unparsed, and at most
    the message budget (256 MiB) of them is read at once."""
    address, proc, _ = process_worker
    fingerprint = WorkerClient(address, "", ClientConfig(token=TOKEN)).info().fingerprint
    rows = (60 << 20) // (D * 4)
    req = pb.RunExpertsRequest(fingerprint=fingerprint, layer=0, experts=[0], counts=[rows],
                               hidden=pb.Tensor(data=bytes(rows * D * 4), dtype="float32", shape=[rows, D]))
    payload = req.SerializeToString()
    del req
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    send = _raw(channel)
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()
    sampler = threading.Thread(target=_sample_peak, args=(proc, stop, peak), daemon=True)
    sampler.start()
    codes = set()
    try:
        for _ in range(3):
            futures = [send.future(payload, timeout=60, metadata=AUTH) for _ in range(16)]
            for f in futures:
                err = _request_failure(f.result)
                codes.add(err.code())
                assert err.details().startswith(("RunExperts message of 60.0 MiB: expected at most",
                                                 "worker busy")), err.details()
    finally:
        stop.set()
        sampler.join()
        channel.close()
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    growth = peak[0] - base
    assert growth < 1 << 30, f"the worker's RSS peaked {growth / 2**20:.0f} MiB above its start"
    assert _health_ok(grpc.insecure_channel(address)) < 2


def _description(om, **config) -> dict:
    from moeshard.protos.wire import model_description

    description = model_description(om.checkpoint.config_dict, om.runtime.local.format)
    description["config"] = {**description["config"], **config}
    return description


@pytest.fixture(scope="module")
def tiny_om(tiny_ckpt):
    om = load_model(tiny_ckpt, prefetch=0)
    yield om
    om.close()


@pytest.mark.parametrize("refusal", ["format", "memory"])
def test_a_refused_model_switch_leaves_the_model_being_served(tiny_om, tmp_path, refusal):
    """--allow-model-switch: a coordinator of another model whose Join is refused takes nothing over."""
    from moeshard.offload_core import OffloadConfig

    shard_cfg = ShardConfig(offload=OffloadConfig(store="ram", prefetch=0, cache_dir=tmp_path),
                            memory_bytes=64 << 20, allow_model_switch=True)
    with InProcessWorker(shard_cfg) as w:
        client = WorkerClient(w.address, tiny_om.fingerprint, ClientConfig())
        keys = [ExpertKey(0, e) for e in range(4)]
        missing, _, _ = client.join(_description(tiny_om), keys)
        client.push(missing, tiny_om.runtime.local.store.source.read_into, tiny_om.runtime.local.format.layout.nbytes)
        client.assign(keys)
        hidden = torch.randn(3, D)
        _, future = client.run_experts_future(0, [2], [3], hidden)
        before = future.result().output
        other = WorkerClient(w.address, "b" * 32, ClientConfig())
        if refusal == "format":  # packed another way than this worker packs it
            description = {**_description(tiny_om), "expert_bytes": 12345}
            expected = grpc.StatusCode.FAILED_PRECONDITION
        else:  # one expert bigger than this worker's memory
            description = {**_description(tiny_om, intermediate_size=10**6), "expert_bytes": 3 * 10**6 * D * 4}
            expected = grpc.StatusCode.RESOURCE_EXHAUSTED
        err = _request_failure(lambda: other.join(description, keys))
        assert err.code() == expected, err.details()
        assert client.info().fingerprint == tiny_om.fingerprint
        _, future = client.run_experts_future(0, [2], [3], hidden)
        assert future.result().output == before
        other.close()
        client.close()


@pytest.mark.parametrize("change, code, text", [
    ({"intermediate_size": 10**7}, grpc.StatusCode.RESOURCE_EXHAUSTED, "(raise its --memory)"),
    ({"intermediate_size": 1e7}, grpc.StatusCode.INVALID_ARGUMENT, "not one this worker can read"),
    ({"num_hidden_layers": 2000}, grpc.StatusCode.INVALID_ARGUMENT, "num_hidden_layers 2000: expected a whole "
                                                                    "number in 1..1024"),
    ({"hidden_size": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "hidden_size 1000000: expected"),
    ({"num_local_experts": 10**8}, grpc.StatusCode.INVALID_ARGUMENT, "100000000 experts per layer: expected 1..16384"),
    ({"num_attention_heads": 0}, grpc.StatusCode.INVALID_ARGUMENT, "transformers cannot build a model from this"),
    ({"vocab_size": 10**9}, grpc.StatusCode.OK, ""),  # no expert is bigger: built on the meta device, allocates nothing
])
def test_descriptions_that_would_allocate_are_refused_before_anything_is_built(tiny_om, tmp_path, change, code, text):
    from moeshard.offload_core import OffloadConfig

    description = _description(tiny_om, **change)
    if change.get("intermediate_size") == 10**7:  # an honest size for that model: 3 matrices of 32 x 1e7 floats
        description["expert_bytes"] = 3 * D * 10**7 * 4
    shard_cfg = ShardConfig(offload=OffloadConfig(store="ram", prefetch=0, cache_dir=tmp_path), memory_bytes=256 << 20)
    with InProcessWorker(shard_cfg) as w:
        client = WorkerClient(w.address, "c" * 32, ClientConfig())
        if code == grpc.StatusCode.OK:
            assert client.join(description, [ExpertKey(0, 1)])[0] == [ExpertKey(0, 1)]
        else:
            err = _request_failure(lambda: client.join(description, [ExpertKey(0, 1)]))
            assert err.code() == code and text in err.details(), err.details()
            assert "alloc" not in err.details() and str(tmp_path) not in err.details()
            assert client.info().fingerprint == ""  # nothing was taken on
        client.close()
