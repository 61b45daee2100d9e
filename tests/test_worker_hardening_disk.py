"""What a worker receives, under accident and attack (issue 22, items 6-8, 10 and 12): an expert damaged on disk is
never served and is sent again; two pushes of one expert survive each other; a push cut short leaves no file and no
descriptor behind; --disk holds on every write and makes room from other models' folders; what a client is told
never carries the worker's paths. In-process workers on 127.0.0.1, each with its own cache under tmp_path."""
import fcntl
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from moeshard.coordinator.cluster import ClusterConfig, join_workers
from moeshard.coordinator.placement import ClusterSpec
from moeshard.coordinator.remote import ClientConfig, WorkerClient
from moeshard.offload_core import ExpertKey, OffloadConfig, load_model
from moeshard.protos import expert_pb2 as pb
from moeshard.protos import expert_pb2_grpc as pb_grpc
from moeshard.protos.wire import tensor_from_pb
from moeshard.worker.disk import DiskBudget, DiskFull
from moeshard.worker.received import ReceivedExperts
from moeshard.offload_core.packed_files import file_bytes
from moeshard.protos.wire import model_description
from moeshard.worker.shard import ShardConfig

from .conftest import NUM_EXPERTS
from .workers import InProcessWorker, wait_until

D = 32
ALL_KEYS = [ExpertKey(layer, e) for layer in range(3) for e in range(NUM_EXPERTS)]
FAST = ClientConfig(rpc_timeout_s=5.0, control_timeout_s=30.0)


@pytest.fixture(scope="module")
def om(tiny_ckpt):
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=0) as model:
        yield model


def packed(om, key: ExpertKey) -> bytes:
    """The coordinator's packed bytes of one expert: what a worker must hold."""
    buf = torch.empty(om.runtime.local.format.layout.nbytes, dtype=torch.uint8)
    om.runtime.local.store.source.read_into(key, buf)
    return buf.numpy().tobytes()


class Pushed:
    """An empty in-process worker (disk store) and a client of the tiny model, joined with `share`."""

    def __init__(self, om, cache, share=ALL_KEYS, push: bool = True, **shard_kwargs):
        cfg = ShardConfig(offload=OffloadConfig(store="disk", prefetch=0, cache_dir=cache), memory_bytes=256 << 20,
                          **shard_kwargs)
        self.om, self.worker, self.share = om, InProcessWorker(cfg).__enter__(), share
        self.description = model_description(om.checkpoint.config_dict, om.runtime.local.format)
        self.nbytes = om.runtime.local.format.layout.nbytes
        self.folder = cache / "received" / om.fingerprint
        self.client = WorkerClient(self.worker.address, om.fingerprint, FAST)
        self.channel = grpc.insecure_channel(self.worker.address)
        self.stub = pb_grpc.ExpertServiceStub(self.channel)
        missing = self.join()
        if push:
            assert self.client.push(missing, lambda k, buf: buf.copy_(torch.frombuffer(bytearray(packed(om, k)),
                                                                                   dtype=torch.uint8)),
                                    self.nbytes) == (len(missing), len(missing) * self.nbytes)
            self.client.assign(share)

    def join(self) -> list[ExpertKey]:
        return self.client.join(self.description, self.share)[0]

    def chunk(self, key: ExpertKey, offset: int, data: bytes, sha: str = "") -> pb.ExpertChunk:
        return pb.ExpertChunk(fingerprint=self.om.fingerprint, expert=pb.ExpertId(layer=key.layer, expert=key.expert),
                              offset=offset, data=data, sha256=sha)

    def whole(self, key: ExpertKey, parts: int = 2) -> list[pb.ExpertChunk]:
        blob = packed(self.om, key)
        step = -(-len(blob) // parts)
        sha = hashlib.sha256(blob).hexdigest()
        return [self.chunk(key, o, blob[o: o + step], sha if o + step >= len(blob) else "")
                for o in range(0, len(blob), step)]

    def run(self, key: ExpertKey, hidden: torch.Tensor) -> torch.Tensor:
        _, future = self.client.run_experts_future(key.layer, [key.expert], [hidden.shape[0]], hidden)
        return tensor_from_pb(future.result().output, max_elements=hidden.numel())

    def leftovers(self) -> list[str]:
        """Temporary files on disk, and descriptors this process holds open on any."""
        parts = [p.name for p in self.folder.glob("*.tmp")]
        return parts + [f.path for f in psutil.Process().open_files() if f.path.endswith(".tmp")]

    def close(self) -> None:
        self.channel.close()
        self.client.close()
        self.worker.__exit__(None, None, None)


@pytest.fixture()
def pushed(om, tmp_path):
    w = Pushed(om, tmp_path)
    yield w
    w.close()


@pytest.fixture()
def joined(om, tmp_path):
    """Joined with the whole model, nothing pushed yet."""
    w = Pushed(om, tmp_path, push=False)
    yield w
    w.close()


def data_start(path) -> int:
    """Where a packed-experts file's data begins (after its safetensors header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def expert_bytes(path) -> bytes:
    """The packed expert a one-expert file holds."""
    data = Path(path).read_bytes()
    return data[data_start(path):]


def flip(path, offset: int = 64, count: int = 64) -> None:
    """Flips bytes of the expert's data in place (the same inode: a worker that holds the file open reads the
    damage)."""
    with open(path, "r+b") as f:
        offset += data_start(path)
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# -- item 6: a damaged expert is a missing one ------------------------------------------------------------------

def test_a_damaged_expert_is_never_served_and_a_join_asks_for_it_again(om, pushed, tmp_path):
    damaged, truncated, fine = ExpertKey(1, 3), ExpertKey(2, 5), ExpertKey(1, 4)
    hidden = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    flip(pushed.folder / "1-3.safetensors")  # while the worker runs, before anything read it
    with pytest.raises(grpc.RpcError) as err:
        pushed.run(damaged, hidden)
    # NOT_FOUND, as an expert it lacks: a coordinator computes it elsewhere and re-joins (see the test below).
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    assert "checksum" in err.value.details() and str(tmp_path) not in err.value.details()
    assert torch.equal(pushed.run(fine, hidden), om.runtime.local.run(1, {4: hidden})[4])
    with pytest.raises(grpc.RpcError) as err:  # dropped: asked again, it is simply not held
        pushed.run(damaged, hidden)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    os.truncate(pushed.folder / "2-5.safetensors", 100)  # found by the Join itself, without a read
    assert pushed.join() == [damaged, truncated]
    assert pushed.client.push([damaged, truncated], lambda k, buf: buf.copy_(
        torch.frombuffer(bytearray(packed(om, k)), dtype=torch.uint8)), pushed.nbytes)[0] == 2
    pushed.client.assign(ALL_KEYS)
    assert torch.equal(pushed.run(damaged, hidden), om.runtime.local.run(1, {3: hidden})[3])
    assert expert_bytes(pushed.folder / "1-3.safetensors") == packed(om, damaged)


def test_a_coordinator_keeps_its_tokens_while_damaged_experts_are_sent_again(tiny_ckpt, tmp_path):
    # Two slots a layer (its memory would buy one for every expert it hosts, which are then never read again)
    cfg = ShardConfig(offload=OffloadConfig(store="disk", prefetch=0, cache_dir=tmp_path), memory_bytes=256 << 20,
                      max_slots_per_layer=2)
    prompt = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9]])
    with InProcessWorker(cfg) as w, load_model(tiny_ckpt, slots_per_layer=2, prefetch=0) as model:
        cluster = join_workers(model, ClusterConfig(ClusterSpec((w.address,), local_share=0.0), FAST, probe_max_s=0.5))

        def generate():
            return model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)

        expected = generate()
        folder = tmp_path / "received" / model.fingerprint
        damaged = {}
        for path in sorted(folder.glob("*.safetensors"))[::6]:  # 4 of 24 experts
            flip(path)
            layer, expert = path.stem.split("-")
            damaged[ExpertKey(int(layer), int(expert))] = expert_bytes(path)
        assert torch.equal(generate(), expected)
        assert cluster.failures[w.address] >= 1  # found damaged, computed by the coordinator meanwhile
        wait_until(lambda: w.address not in cluster.down, 30, "the worker to be given its experts again")
        assert torch.equal(generate(), expected)
        wait_until(lambda: w.address not in cluster.down, 30, "the worker to be given its experts again")
        # Each damaged expert it read was sent again; one not read since is found when it is.
        resent = {k for k in damaged if expert_bytes(folder / f"{k.layer}-{k.expert}.safetensors") == packed(model, k)}
        assert resent and all(expert_bytes(folder / f"{k.layer}-{k.expert}.safetensors") == damaged[k]
                              for k in set(damaged) - resent)


# -- item 7: two pushes of one expert ---------------------------------------------------------------------------

def test_two_pushes_of_one_expert_at_once_both_succeed(joined):
    key = ExpertKey(0, 1)
    first, second = joined.whole(key), joined.whole(key)
    other_done = threading.Event()

    def slow():  # half of the expert, then the rest once the other push has finished
        yield first[0]
        other_done.wait(10)
        yield first[1]

    a = joined.stub.PushExperts.future(slow(), timeout=30)
    wait_until(lambda: list(joined.folder.glob("*.tmp")), 10, "the first push to begin the expert")
    b = joined.stub.PushExperts(iter(second), timeout=30)
    other_done.set()
    assert b.experts == 1 and a.result().experts == 1  # a retry while a push runs: both verified
    assert expert_bytes(joined.folder / "0-1.safetensors") == packed(joined.om, key)
    assert key not in joined.join() and not joined.leftovers()


def test_the_first_verified_copy_is_kept_and_a_held_expert_is_not_written_again(tmp_path):
    nbytes = 1000
    store = ReceivedExperts.open(tmp_path, "f" * 32, {"config": {}}, nbytes)
    key, blob = ExpertKey(0, 1), bytes(range(250)) * 4
    sha = hashlib.sha256(blob).hexdigest()
    a, b = store.incoming(), store.incoming()
    assert a.write(key, 0, blob[:500]) is False and b.write(key, 0, blob[:500]) is False
    assert b.write(key, 500, blob[500:], sha) is True and a.write(key, 500, blob[500:], sha) is True
    assert a.close() == [] and b.close() == []  # the second committed is discarded, without error
    assert store.held() == {key} and sorted(p.name for p in store.folder.iterdir()) == [
        "0-1.safetensors", "model.json"]
    again = store.incoming()  # a retry of an expert held already: checked, never written
    again.write(key, 0, blob[:500])
    assert not list(store.folder.glob("*.tmp"))
    assert again.write(key, 500, blob[500:], sha) is True and again.close() == []
    out = torch.empty(nbytes, dtype=torch.uint8)
    store.read_into(key, out)
    assert out.numpy().tobytes() == blob
    store.close()


# -- item 8: a push cut short -----------------------------------------------------------------------------------

def test_a_push_that_ends_mid_expert_is_refused_and_leaves_nothing_behind(joined):
    key = ExpertKey(0, 2)
    chunks = joined.whole(key)
    with pytest.raises(grpc.RpcError) as err:
        joined.stub.PushExperts(iter(chunks[:1]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended in the middle of expert (0, 2)" in err.value.details()
    assert not joined.leftovers()  # no temporary file, no descriptor
    assert joined.stub.PushExperts(iter(chunks), timeout=30).experts == 1  # the right push works the first time
    assert key not in joined.join()


def test_a_push_may_leave_only_a_few_experts_incomplete(joined):
    halves = [joined.whole(ExpertKey(1, e))[0] for e in range(5)]
    with pytest.raises(grpc.RpcError) as err:
        joined.stub.PushExperts(iter(halves), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected at most 4" in err.value.details(), err.value.details()
    assert not joined.leftovers()


def test_a_cancelled_push_drops_its_incomplete_expert(joined):
    chunks, stop = joined.whole(ExpertKey(2, 0)), threading.Event()

    def hanging():
        yield chunks[0]
        stop.wait(10)

    call = joined.stub.PushExperts.future(hanging(), timeout=30)
    wait_until(lambda: list(joined.folder.glob("*.tmp")), 10, "the push to begin")
    call.cancel()
    stop.set()
    wait_until(lambda: not joined.leftovers(), 10, "the cancelled push's file and descriptor to go")


# -- item 10: --disk on every write -----------------------------------------------------------------------------

def test_disk_cap_holds_while_held_experts_are_pushed_again(om, tmp_path):
    nbytes = om.runtime.local.format.layout.nbytes
    cap = 10 * nbytes + (16 << 10)  # room for 10 experts, and the model's description and log
    w = Pushed(om, tmp_path, share=ALL_KEYS[:8], disk_bytes=cap)
    try:
        paused, go_on = threading.Event(), threading.Event()

        def again():  # the same 8 experts, then a pause before the stream ends (a slow re-push)
            for key in w.share:
                yield from w.whole(key)
            paused.set()
            go_on.wait(10)

        call = w.stub.PushExperts.future(again(), timeout=30)
        paused.wait(10)
        used = 0
        for _ in range(10):  # while the worker takes the last chunks in
            used = max(used, sum(p.stat().st_size for p in (tmp_path / "received").rglob("*") if p.is_file()))
            time.sleep(0.05)
        go_on.set()
        assert call.result().experts == 8
        assert used <= cap, f"{used} bytes on disk under a cap of {cap}"
    finally:
        w.close()


def test_writes_reserve_their_disk_before_the_first_byte(tmp_path):
    nbytes = 1000
    per_expert = file_bytes([ExpertKey(0, 0)], nbytes, {"fingerprint": "f" * 32})  # the expert and its header
    store = ReceivedExperts.open(tmp_path, "f" * 32, {"config": {}}, nbytes, DiskBudget(tmp_path, 2 * per_expert + 512))
    blob = bytes(nbytes)
    a, b = store.incoming(), store.incoming()
    a.write(ExpertKey(0, 0), 0, blob[:10])
    b.write(ExpertKey(0, 1), 0, blob[:10])
    with pytest.raises(DiskFull, match=r"expert \(0, 2\) needs .* more than this worker's --disk"):
        b.write(ExpertKey(0, 2), 0, blob[:10])
    assert len(list(store.folder.glob("*.tmp"))) == 2
    a.close()  # dropped incomplete: its reservation is given back
    b.write(ExpertKey(0, 2), 0, blob[:10])
    b.close()
    store.close()


def test_other_models_folders_make_room_least_recently_used_first(om, tmp_path):
    nbytes = om.runtime.local.format.layout.nbytes
    root = tmp_path / "received"
    old, recent, busy = (root / (c * 32) for c in "abc")
    for age, folder in enumerate((old, recent, busy)):
        folder.mkdir(parents=True)
        (folder / "0-0.safetensors").write_bytes(bytes(5 * nbytes))
        os.utime(folder, (1_000_000 + age, 1_000_000 + age))
    lock = os.open(busy, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_SH)  # another worker serves this one: never removed
    try:
        # 15 experts on disk, a cap of 22: receiving 8 needs one folder removed, the one unused longest.
        w = Pushed(om, tmp_path, share=ALL_KEYS[:8], disk_bytes=22 * nbytes)
        try:
            assert not old.exists() and recent.exists() and busy.exists() and w.folder.is_dir()
            assert len(list(w.folder.glob("*.safetensors"))) == 8
            with pytest.raises(DiskFull, match="--disk"):  # the busy folder is all that is left: kept
                w.worker.shard.received.disk.room(30 * nbytes, om.fingerprint, "30 experts")
            assert not recent.exists() and busy.exists()
        finally:
            w.close()
    finally:
        os.close(lock)


# -- item 12: a folder in an expert's place; no path in a status message ----------------------------------------

def test_a_folder_in_place_of_an_expert_file_is_replaced(om, tmp_path):
    w = Pushed(om, tmp_path)
    folder = w.folder
    w.close()
    (folder / "0-3.safetensors").unlink()
    (folder / "0-3.safetensors").mkdir()
    (folder / "0-3.safetensors" / "stray").write_bytes(b"x")
    w = Pushed(om, tmp_path, push=False)  # a restart on the same cache
    try:
        assert w.join() == [ExpertKey(0, 3)]
        assert w.stub.PushExperts(iter(w.whole(ExpertKey(0, 3))), timeout=30).experts == 1
        w.client.assign(ALL_KEYS)
        hidden = torch.randn(2, D)
        assert torch.equal(w.run(ExpertKey(0, 3), hidden), om.runtime.local.run(0, {3: hidden})[3])
    finally:
        w.close()


def test_status_messages_never_carry_the_workers_paths(joined, tmp_path):
    shutil.rmtree(joined.folder)
    joined.folder.write_bytes(b"not a folder")  # the model's folder replaced by a file: nothing can be written
    with pytest.raises(grpc.RpcError) as err:
        joined.stub.PushExperts(iter(joined.whole(ExpertKey(0, 4))), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "Not a directory" in err.value.details() and "/" not in err.value.details(), err.value.details()
