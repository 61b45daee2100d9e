"""Workers that need only an address: started without the model, they receive their share from the coordinator
(verified, kept on disk, never sent twice), and a worker that is down when the coordinator starts is treated like
one that dies later. Real worker processes on 127.0.0.1."""
import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from safetensors import safe_open

from moeshard.coordinator.cluster import ClusterConfig, ExpertUnavailable, Unavailable, join_workers
from moeshard.coordinator.local_workers import LocalWorkers
from moeshard.coordinator.placement import ClusterError, ClusterSpec, hosted_by
from moeshard.coordinator.remote import ClientConfig, WorkerClient
from moeshard.offload_core import ExpertKey, load_model
from moeshard.protos import expert_pb2 as pb
from moeshard.protos.wire import AUTH_METADATA_KEY, bearer

from .conftest import NUM_EXPERTS, make_checkpoint
from .workers import wait_until

pytestmark = pytest.mark.slow  # worker processes started, killed and restarted

PROMPT = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9]])
NEW = 24
ALL_KEYS = [ExpertKey(layer, e) for layer in range(3) for e in range(NUM_EXPERTS)]
TOKEN = "join-test-token"
FAST = ClientConfig(token=TOKEN, rpc_timeout_s=5.0, control_timeout_s=30.0)


def generate(om) -> torch.Tensor:
    return om.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module")
def expected(tiny_ckpt, reference):
    return generate(reference(tiny_ckpt))


def received_dir(cache: Path, fingerprint: str) -> Path:
    return cache / "received" / fingerprint


def held_on_disk(cache: Path, fingerprint: str) -> dict[ExpertKey, str]:
    """The experts a worker's cache folder holds (one packed-experts file each), with the SHA-256 of each one's
    bytes."""
    out = {}
    for path in received_dir(cache, fingerprint).glob("*.safetensors"):
        layer, expert = path.stem.split("-")
        with safe_open(str(path), framework="pt") as f:
            data = f.get_tensor(f"{layer}.{expert}").numpy().tobytes()
        out[ExpertKey(int(layer), int(expert))] = hashlib.sha256(data).hexdigest()
    return out


def coordinator_bytes(om, key: ExpertKey) -> str:
    buf = torch.empty(om.runtime.local.format.layout.nbytes, dtype=torch.uint8)
    om.runtime.local.store.source.read_into(key, buf)
    return hashlib.sha256(buf.numpy().tobytes()).hexdigest()


def pushed(cluster) -> dict[str, int]:
    return {name: d["pushed_bytes"] for name, d in cluster.describe().items()}


@pytest.fixture()
def empty_workers(tmp_path):
    caches = [tmp_path / "w0", tmp_path / "w1"]
    # A fixed --memory: placement by reported memory is then the same from one start to the next.
    with LocalWorkers(2, None, extra_args=("--token", TOKEN, "--memory", "1GiB"), cache_dirs=caches,
                      log_dir=tmp_path) as workers:
        yield workers, caches


@pytest.mark.parametrize("placement", ["all-remote", "half-remote"])
def test_workers_without_the_model_receive_exactly_their_experts(tiny_ckpt, expected, empty_workers, placement):
    workers, caches = empty_workers
    a, b = workers.addresses
    spec = ClusterSpec((a, b), {k: ((a,) if (k.layer + k.expert) % 2 else (b,)) for k in ALL_KEYS}) \
        if placement == "all-remote" else ClusterSpec((a, b), local_share=0.5)
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1) as om:
        cluster = join_workers(om, ClusterConfig(spec, FAST))
        assert not cluster.down
        assert torch.equal(generate(om), expected)
        nbytes = om.runtime.local.format.layout.nbytes
        for address, cache in zip((a, b), caches):
            share = set(hosted_by(cluster.placement, address))
            held = held_on_disk(cache, om.fingerprint)
            assert set(held) == share and share  # exactly its experts, no more
            assert all(held[k] == coordinator_bytes(om, k) for k in share)  # byte for byte the coordinator's
            assert pushed(cluster)[address] == len(share) * nbytes
            assert cluster.describe()[address]["requests"] > 0
        # The folder says what the model is (JSON); each expert file carries its SHA-256 in its header.
        folder = received_dir(caches[0], om.fingerprint)
        model = json.loads((folder / "model.json").read_text())
        assert model["fingerprint"] == om.fingerprint and model["expert_bytes"] == nbytes
        for key, digest in held_on_disk(caches[0], om.fingerprint).items():
            with safe_open(str(folder / f"{key.layer}-{key.expert}.safetensors"), framework="pt") as f:
                assert f.metadata()[f"sha256.{key.layer}.{key.expert}"] == digest
    # A second coordinator of the same model (or this one, restarted) sends nothing.
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1) as om:
        cluster = join_workers(om, ClusterConfig(spec, FAST))
        assert pushed(cluster) == {a: 0, b: 0}
        assert torch.equal(generate(om), expected)


def test_restart_sends_nothing_and_damaged_experts_are_sent_again(tiny_ckpt, expected, empty_workers):
    workers, caches = empty_workers
    spec = ClusterSpec(tuple(workers.addresses), local_share=0.0)
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1) as om:
        join_workers(om, ClusterConfig(spec, FAST))
        fingerprint, nbytes = om.fingerprint, om.runtime.local.format.layout.nbytes
    workers.stop(0)
    files = sorted(received_dir(caches[0], fingerprint).glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated
    flipped = bytearray(files[1].read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one flipped byte
    files[1].write_bytes(bytes(flipped))
    workers.restart(0)
    workers.restart(1)
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1) as om:
        cluster = join_workers(om, ClusterConfig(spec, FAST))
        assert pushed(cluster) == {workers.addresses[0]: 2 * nbytes, workers.addresses[1]: 0}
        assert torch.equal(generate(om), expected)
        held = held_on_disk(caches[0], fingerprint)
        assert all(held[k] == coordinator_bytes(om, k) for k in held)


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """12.6 MB experts, 8 of them: a push long enough to kill a worker in the middle of."""
    return make_checkpoint(tmp_path_factory.mktemp("wide-join"), seed=4, hidden_size=256, intermediate_size=4096,
                           num_hidden_layers=1)


def test_a_push_cut_by_sigkill_resumes_with_only_what_is_missing(wide_ckpt, tmp_path):
    cache = tmp_path / "w0"
    with LocalWorkers(1, None, extra_args=("--token", TOKEN), cache_dirs=[cache], log_dir=tmp_path) as workers:
        (address,) = workers.addresses
        proc = psutil.Process(workers.procs[0].pid)
        with load_model(wide_ckpt, slots_per_layer=1, prefetch=0) as om:
            nbytes = om.runtime.local.format.layout.nbytes
            folder = received_dir(cache, om.fingerprint)
            base, peak, killed = [None], [0], threading.Event()

            def watch():  # the worker's RSS from the first chunk received on; kill it once 3 experts are in
                while not killed.is_set():
                    try:
                        rss = proc.memory_info().rss
                        if base[0] is None and folder.is_dir() and any(folder.glob("*.tmp")):
                            base[0] = rss  # joined: the model is built, the push has begun
                        peak[0] = max(peak[0], rss)
                        if folder.is_dir() and len(list(folder.glob("*.safetensors"))) >= 3:
                            workers.signal(0, signal.SIGKILL)
                            killed.set()
                    except (psutil.NoSuchProcess, ValueError):
                        pass
                    time.sleep(0.002)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            cfg = ClusterConfig(ClusterSpec((address,), local_share=0.0), FAST, probe_max_s=0.5)
            cluster = join_workers(om, cfg)  # the push breaks off: the worker starts down
            killed.set()
            watcher.join()
            assert address in cluster.down
            # Streamed into place, never buffered: receiving 8 x 12.6 MB moved RSS by far less than one expert.
            assert base[0] is not None
            assert peak[0] - base[0] < 64 << 20, f"RSS grew {(peak[0] - base[0]) / 2**20:.1f} MiB while receiving"
            before = len(held_on_disk(cache, om.fingerprint))
            assert 3 <= before < NUM_EXPERTS
            first_push = pushed(cluster)[address]
            workers.restart(0)
            wait_until(lambda: address not in cluster.down, 60, "the worker to rejoin")
            assert pushed(cluster)[address] - first_push == (NUM_EXPERTS - before) * nbytes
            assert len(held_on_disk(cache, om.fingerprint)) == NUM_EXPERTS
            with torch.no_grad():
                om(torch.tensor([[1, 2, 3, 4]]))
            assert cluster.describe()[address]["requests"] > 0


def test_another_model_cannot_take_over_a_worker_unless_allowed(tiny_ckpt, tiny_sharded_ckpt, tmp_path):
    for allow in (False, True):
        cache = tmp_path / f"allow-{allow}"
        extra = ("--token", TOKEN, *(("--allow-model-switch",) if allow else ()))
        with LocalWorkers(1, None, extra_args=extra, cache_dirs=[cache], log_dir=tmp_path) as workers:
            spec = ClusterSpec(tuple(workers.addresses), local_share=0.0)
            with load_model(tiny_ckpt, prefetch=0) as first:
                join_workers(first, ClusterConfig(spec, FAST))
                before = held_on_disk(cache, first.fingerprint)
                with load_model(tiny_sharded_ckpt, prefetch=0) as second:
                    if not allow:
                        with pytest.raises(ClusterError, match="refused to join.*fingerprint mismatch") as refused:
                            join_workers(second, ClusterConfig(spec, FAST))
                        # it received its experts: the advice is a restart or --allow-model-switch (issue 21.5)
                        assert "--allow-model-switch" in str(refused.value) and "same checkpoint" not in str(refused.value)
                    else:
                        cluster = join_workers(second, ClusterConfig(spec, FAST))
                        assert not cluster.down and held_on_disk(cache, second.fingerprint)
                # Either way, the first model's received experts are untouched.
                assert held_on_disk(cache, first.fingerprint) == before


def test_pushes_need_the_token_and_must_fit_memory_and_disk(tiny_ckpt, tmp_path):
    caches = [tmp_path / "small-memory", tmp_path / "small-disk"]
    with LocalWorkers(1, None, extra_args=("--token", TOKEN, "--memory", "64KiB"), cache_dirs=caches[:1],
                      log_dir=tmp_path) as small, \
            LocalWorkers(1, None, extra_args=("--token", TOKEN, "--disk", "100KiB"), cache_dirs=caches[1:],
                         log_dir=tmp_path) as tight:
        with load_model(tiny_ckpt, prefetch=0) as om:
            share = ALL_KEYS[:12]
            from moeshard.protos.wire import model_description

            description = model_description(om.checkpoint.config_dict, om.runtime.local.format)
            # Without the token: refused, and nothing reaches the disk.
            channel = grpc.insecure_channel(small.addresses[0])
            push = channel.stream_unary("/moeshard.v1.ExpertService/PushExperts", request_serializer=None,
                                        response_deserializer=None)
            chunk = pb.ExpertChunk(fingerprint=om.fingerprint, expert=pb.ExpertId(layer=0, expert=0), offset=0,
                                   data=b"\0" * 1024).SerializeToString()
            with pytest.raises(grpc.RpcError) as err:
                push(iter([chunk] * 4), timeout=10, metadata=((AUTH_METADATA_KEY, bearer("wrong")),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            channel.close()
            for worker, what in ((small, "--memory"), (tight, "--disk")):
                client = WorkerClient(worker.addresses[0], om.fingerprint, FAST)
                with pytest.raises(grpc.RpcError) as err:
                    client.join(description, share)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert what in err.value.details() and err.value.details().count("MiB") >= 2, err.value.details()
                client.close()
        assert not any(p.suffix in (".safetensors", ".tmp") for c in caches if c.exists() for p in c.rglob("*"))


def test_a_worker_down_at_start_is_used_once_it_comes_up(tiny_ckpt, expected, empty_workers):
    workers, caches = empty_workers
    a, b = workers.addresses
    workers.stop(1)  # b is down when the coordinator starts
    spec = ClusterSpec((a, b), local_share=0.0)
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1) as om:
        start = time.monotonic()
        cluster = join_workers(om, ClusterConfig(spec, FAST, probe_max_s=0.5))
        assert time.monotonic() - start < 20 and cluster.down == {b} and not cluster.failures
        assert hosted_by(cluster.placement, b)  # it keeps its share, computed by the coordinator meanwhile
        assert torch.equal(generate(om), expected)
        assert cluster.describe()[b]["requests"] == 0
        workers.restart(1)
        wait_until(lambda: b not in cluster.down, 60, f"{b} to join")
        assert set(held_on_disk(caches[1], om.fingerprint)) == set(hosted_by(cluster.placement, b))
        assert torch.equal(generate(om), expected)
        assert cluster.describe()[b]["requests"] > 0 and cluster.describe()[b]["state"] == "serving"
    workers.stop(1)
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1) as om:
        join_workers(om, ClusterConfig(spec, FAST, Unavailable.FAIL))
        with pytest.raises(ExpertUnavailable, match=rf"has no live owner: its workers \['{b}'\] are down"):
            generate(om)


def test_health_and_metrics_tell_the_truth_about_workers(tiny_tok_ckpt, tmp_path):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from moeshard.coordinator.engine import Engine
    from moeshard.coordinator.http_security import ServeConfig
    from moeshard.coordinator.server import create_app
    from moeshard.offload_core import OffloadConfig

    caches = [tmp_path / "w0", tmp_path / "w1"]
    with LocalWorkers(2, None, extra_args=("--token", TOKEN), cache_dirs=caches, log_dir=tmp_path) as workers:
        a, b = workers.addresses
        cluster_cfg = ClusterConfig(ClusterSpec((a, b), local_share=0.0), FAST, probe_max_s=60)
        engine = Engine.load(tiny_tok_ckpt, OffloadConfig(slots_per_layer=2, prefetch=1), cluster_cfg, progress=False)
        try:
            client = TestClient(create_app(engine, ServeConfig(api_key="k")))
            auth = {"Authorization": "Bearer k"}
            health = client.get("/health", headers=auth).json()
            assert health["status"] == "ok" and {w["state"] for w in health["workers"].values()} == {"serving"}
            assert all(w["pushed_bytes"] > 0 and w["hosted_experts"] > 0 for w in health["workers"].values())
            reply = client.post("/v1/completions", headers=auth, json={"model": engine.name, "prompt": "def f(",
                                                                        "max_tokens": 8, "temperature": 0})
            assert reply.status_code == 200
            killed = time.time()
            workers.signal(1, signal.SIGKILL)
            client.post("/v1/completions", headers=auth, json={"model": engine.name, "prompt": "class A:",
                                                                "max_tokens": 8, "temperature": 0})
            health = client.get("/health", headers=auth).json()
            assert health["status"] == "degraded" and client.get("/health").json() == {"status": "degraded"}
            assert health["workers"][b]["state"] == "down" and health["workers"][b]["since"] >= killed - 1
            assert health["workers"][a]["state"] == "serving"
            metrics = {(s.name, s.labels.get("worker"), s.labels.get("le")): s.value
                       for family in text_string_to_metric_families(client.get("/metrics", headers=auth).text)
                       for s in family.samples}
            assert metrics[("moeshard_worker_up", a, None)] == 1 and metrics[("moeshard_worker_up", b, None)] == 0
            assert metrics[("moeshard_worker_failures_total", b, None)] >= 1
            assert metrics[("moeshard_worker_pushed_bytes_total", a, None)] > 0
            assert metrics[("moeshard_worker_rpc_latency_seconds_count", a, None)] > 0
            assert metrics[("moeshard_worker_rpc_latency_seconds_bucket", a, "+Inf")] == \
                metrics[("moeshard_worker_rpc_latency_seconds_count", a, None)]
        finally:
            engine.close()


def test_received_experts_are_held_only_once_committed_and_a_restart_keeps_exactly_those(tmp_path):
    from moeshard.worker.received import ReceiveError, ReceivedExperts

    description, nbytes = {"config": {}, "format": {}, "expert_bytes": 1000}, 1000
    store = ReceivedExperts.open(tmp_path, "f" * 32, description, nbytes)
    push = store.incoming()
    blobs = {ExpertKey(0, e): bytes([e]) * nbytes for e in range(3)}
    for key, blob in list(blobs.items())[:2]:
        assert push.write(key, 0, blob[:600]) is False
        assert push.write(key, 600, blob[600:], hashlib.sha256(blob).hexdigest()) is True
    assert store.held() == frozenset()  # verified, not yet durable: not announced as held
    with pytest.raises(ReceiveError, match="already received in this push"):
        push.write(ExpertKey(0, 0), 0, blobs[ExpertKey(0, 0)])
    assert push.commit() == 2 and push.commit() == 0
    assert store.held() == {ExpertKey(0, 0), ExpertKey(0, 1)}
    push.write(ExpertKey(0, 2), 0, blobs[ExpertKey(0, 2)], hashlib.sha256(blobs[ExpertKey(0, 2)]).hexdigest())
    # A restart before the third was committed (a crash): the first two are held, the third is sent again.
    again = ReceivedExperts.open(tmp_path, "f" * 32, description, nbytes)
    assert again.held() == {ExpertKey(0, 0), ExpertKey(0, 1)}
    out = torch.empty(nbytes, dtype=torch.uint8)
    again.read_into(ExpertKey(0, 1), out)
    assert bytes(out.numpy()) == blobs[ExpertKey(0, 1)]


def test_a_worker_started_with_defaults_computes_with_the_coordinators_slots(tmp_path):
    """Issue 21.3: a worker's own default (2 slots per layer) used to decide its cache, whatever the coordinator
    was told: a top-4-of-32 model with k = 16 hit 0.9 alone and far less through a worker. Issue 24: a worker's
    --memory buys its slots in bytes, as the coordinator's --expert-memory does: with room for every expert it hosts
    it keeps them all (at least the coordinator's hit rate); its --slots-per-layer is a cap."""
    from moeshard.worker.shard import ShardConfig

    from .families import make_family_checkpoint
    from .workers import InProcessWorker

    path = make_family_checkpoint(tmp_path / "many", "qwen3_moe", num_experts=32, num_experts_per_tok=4,
                                  mlp_only_layers=[])
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))

    def hit_rate(worker_cfg: ShardConfig | None) -> tuple[float, int | None]:
        with load_model(path, slots_per_layer=16, prefetch=0) as om:
            slots = None
            if worker_cfg is not None:
                worker = InProcessWorker(worker_cfg).__enter__()
                cluster = join_workers(om, ClusterConfig(ClusterSpec((worker.address,), local_share=0.0)))
                slots = cluster.workers[worker.address].slots_per_layer
            try:
                with torch.no_grad():
                    om.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                return om.stats().total.hit_rate, slots
            finally:
                if worker_cfg is not None:
                    worker.__exit__(None, None, None)

    alone, _ = hit_rate(None)
    followed, slots = hit_rate(ShardConfig(model=None))
    assert slots == 32 and followed >= alone - 0.02, (alone, followed)  # every hosted expert of a layer: 32
    capped, slots = hit_rate(ShardConfig(model=None, max_slots_per_layer=4))
    assert slots == 4 and capped < alone - 0.05, (alone, capped)  # the cap holds, and it shows


@pytest.mark.parametrize("policy", ["global-lru", "lru"])
def test_a_worker_evicts_as_its_coordinator_does(tiny_ckpt, tmp_path, policy):
    """Issue 24: the coordinator's --policy reaches its workers at Join (a global cache there too), and tokens stay."""
    from moeshard.offload_core.config import DEFAULT_POLICY, OffloadConfig
    from moeshard.worker.shard import ShardConfig

    from .workers import InProcessWorker

    prompt = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9]])
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=1, policy=policy) as om:
        expected = om.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        cfg = ShardConfig(offload=OffloadConfig(prefetch=0, cache_dir=tmp_path), max_slots_per_layer=2)
        with InProcessWorker(cfg) as worker:
            assert worker.shard is None or worker.shard.backend.policy == DEFAULT_POLICY
            join_workers(om, ClusterConfig(ClusterSpec((worker.address,), local_share=0.0), FAST))
            backend = worker.shard.backend
            assert backend.policy == policy
            pools = {id(s.pool) for s in backend.slots.values()}
            assert len(pools) == (1 if policy.startswith("global") else len(backend.slots))
            assert torch.equal(om.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False), expected)
            assert sum(c.hits + c.misses for c in backend.counters().values()) > 0  # the worker computed
            # a policy the worker does not know is refused, by name
            client = WorkerClient(worker.address, om.fingerprint, FAST)
            from moeshard.protos.wire import model_description

            with pytest.raises(grpc.RpcError) as err:
                client.join(model_description(om.checkpoint.config_dict, om.runtime.local.format), [ExpertKey(0, 0)],
                            2, "fifo")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy 'fifo'" in err.value.details()
            client.close()
