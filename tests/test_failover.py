"""Worker failures with real processes on loopback: nothing lost, tokens identical, workers rejoin."""
import random
import signal
import time

import grpc
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from moeshard.coordinator.cluster import ClusterConfig, ExpertUnavailable, Unavailable, join_workers
from moeshard.coordinator.local_workers import LocalWorkers
from moeshard.coordinator.placement import ClusterSpec
from moeshard.coordinator.remote import ClientConfig, WorkerClient
from moeshard.offload_core import ExpertKey, load_model

from .conftest import NUM_EXPERTS, make_checkpoint
from .workers import wait_until

pytestmark = pytest.mark.slow  # real worker processes killed, stopped and drained: ~2 min on 2 cores

PROMPT = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9]])
NEW = 16
ALL_KEYS = [ExpertKey(layer, e) for layer in range(3) for e in range(NUM_EXPERTS)]


class AtStep(StoppingCriteria):
    """Runs `action` once, when generation reaches step `step` (never stops generation)."""

    def __init__(self, step: int, action):
        self.step, self.action, self.calls = step, action, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            self.action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def generate(model, criteria=None):
    kwargs = {"stopping_criteria": StoppingCriteriaList([criteria])} if criteria else {}
    return model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def reference_tokens(tiny_ckpt, reference):
    return generate(reference(tiny_ckpt))


@pytest.fixture()
def cluster(tiny_ckpt):
    """Two real workers; every expert on one of them, with a replica on the other for odd experts."""
    with LocalWorkers(2, tiny_ckpt) as workers:
        a, b = workers.addresses
        placement = {k: ((a, b) if k.expert % 2 else (a,)) if k.layer % 2 == 0 else (b,) for k in ALL_KEYS}
        model = load_model(tiny_ckpt, slots_per_layer=2, prefetch=1)
        cluster = join_workers(model, ClusterConfig(ClusterSpec((a, b), placement), ClientConfig(rpc_timeout_s=2.0),
                                                    probe_max_s=0.5))
        yield model, workers, cluster
        model.close()


def test_sigkill_at_a_random_step_four_times(cluster, reference_tokens):
    model, workers, runtime = cluster
    rng = random.Random(0)
    for run in range(4):
        victim = run % 2
        address = workers.addresses[victim]
        criteria = AtStep(rng.randint(1, NEW - 1), lambda v=victim: workers.signal(v, signal.SIGKILL))
        tokens = generate(model, criteria)
        assert torch.equal(tokens, reference_tokens), f"run {run}: tokens differ after killing {address}"
        assert address in runtime.down
        workers.restart(victim)
        wait_until(lambda a=address: a not in runtime.down, 30, f"{address} to rejoin")
        before = runtime.workers[address].describe()["requests"]
        assert torch.equal(generate(model), reference_tokens)
        assert runtime.workers[address].describe()["requests"] > before, f"{address} did not serve after rejoining"
    assert runtime.failures[workers.addresses[0]] >= 2 and runtime.failures[workers.addresses[1]] >= 2


def test_worker_past_its_deadline_falls_back(cluster, reference_tokens):
    model, workers, runtime = cluster
    address = workers.addresses[1]
    workers.signal(1, signal.SIGSTOP)  # a hung machine: connections stay open, nothing answers
    try:
        tokens = generate(model)
        assert torch.equal(tokens, reference_tokens)
        assert address in runtime.down and runtime.failures[address] >= 1
    finally:
        workers.signal(1, signal.SIGCONT)
    wait_until(lambda: address not in runtime.down, 30, f"{address} to rejoin")
    assert torch.equal(generate(model), reference_tokens)


def test_no_live_owner_and_no_fallback_fails_naming_the_expert(tiny_ckpt):
    with LocalWorkers(1, tiny_ckpt) as workers:
        (a,) = workers.addresses
        spec = ClusterSpec((a,), {k: (a,) for k in ALL_KEYS})
        failing, dropping = load_model(tiny_ckpt, prefetch=0), load_model(tiny_ckpt, prefetch=0)
        join_workers(failing, ClusterConfig(spec, ClientConfig(rpc_timeout_s=2.0), Unavailable.FAIL))
        join_workers(dropping, ClusterConfig(spec, ClientConfig(rpc_timeout_s=2.0), Unavailable.DROP))
        workers.signal(0, signal.SIGKILL)
        with pytest.raises(ExpertUnavailable, match=r"expert \(layer 0, expert \d\) has no live owner"):
            generate(failing)
        tokens = generate(dropping)  # explicit: every expert dropped, so every MoE output is zero
        assert tokens.shape == (1, PROMPT.shape[1] + NEW)
        failing.close()
        dropping.close()


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("wide"), seed=4, hidden_size=256, intermediate_size=4096,
                           num_hidden_layers=1)


def test_sigterm_during_a_request_completes_it_then_exits_zero(wide_ckpt):
    with LocalWorkers(1, wide_ckpt, extra_args=("--grace", "30")) as workers:
        model = load_model(wide_ckpt, prefetch=0)
        client = WorkerClient(workers.addresses[0], model.fingerprint, ClientConfig(rpc_timeout_s=60))
        client.assign([ExpertKey(0, 0)])
        hidden = torch.randn(6000, 256, generator=torch.Generator().manual_seed(0))  # ~1-3 s of compute
        _, future = client.run_experts_future(0, [0], [6000], hidden)
        time.sleep(0.3)
        workers.signal(0, signal.SIGTERM)
        reply = future.result()
        assert list(reply.output.shape) == [6000, 256]
        assert workers.procs[0].wait(timeout=30) == 0
        _, late = client.run_experts_future(0, [0], [1], hidden[:1])
        with pytest.raises(grpc.RpcError):
            late.result()
        client.close()
