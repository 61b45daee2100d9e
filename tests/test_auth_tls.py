"""Worker security: the shared token (every RPC, health included, refused before any work) and TLS.

Certificates are made here with `cryptography`: a throwaway CA and a server certificate it signs for
127.0.0.1 and localhost. Workers are real grpc.aio servers on 127.0.0.1 port 0.
"""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeshard.coordinator.remote import ClientConfig, WorkerClient
from moeshard.offload_core import ExpertKey, load_model
from moeshard.protos import expert_pb2 as pb
from moeshard.protos import expert_pb2_grpc as pb_grpc
from moeshard.protos.wire import AUTH_METADATA_KEY, tensor_from_pb
from moeshard.worker.server import ServerConfig, WorkerServer
from moeshard.worker.shard import ShardConfig

from .workers import InProcessWorker

TOKEN = "s3cret"
HOSTED = frozenset({ExpertKey(2, 5), ExpertKey(2, 6), ExpertKey(2, 7)})
FAST = dict(rpc_timeout_s=5.0, control_timeout_s=5.0)  # a refusal is immediate; a hang should not last minutes


class ConfiguredWorker(InProcessWorker):
    """`InProcessWorker` with a `ServerConfig` of the test's choosing (token, TLS); same lifecycle."""

    def __init__(self, shard_cfg: ShardConfig, server_cfg: ServerConfig):
        super().__init__(shard_cfg)
        self.server = WorkerServer(shard_cfg, server_cfg)  # replaces the loopback, no-token one; nothing started yet


# -- certificates -----------------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str):
    """(key, certificate) of a self-signed CA valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca, names: list[x509.GeneralName]) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a server known by `names`, signed by `ca`."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("moe-worker")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem(key)


@pytest.fixture(scope="module")
def pki():
    ca, other_ca = make_ca("moeshard test CA"), make_ca("someone else's CA")
    pem = lambda c: c[1].public_bytes(serialization.Encoding.PEM)  # noqa: E731
    return dict(ca=pem(ca), other_ca=pem(other_ca),
                server=make_server_cert(ca, [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                             x509.DNSName("localhost")]),
                elsewhere=make_server_cert(ca, [x509.DNSName("elsewhere.invalid")]))


# -- shared workers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local(tiny_ckpt):
    """The coordinator-side experts of the same checkpoint: what a remote result must equal bit for bit."""
    model = load_model(tiny_ckpt, slots_per_layer=2, prefetch=0)
    yield model.fingerprint, model.runtime.local
    model.close()


def _check_remote_equals_local(client: WorkerClient, local_experts) -> None:
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))  # [T, D]
    _, future = client.run_experts_future(2, [5, 6], [3, 2], hidden)
    out = tensor_from_pb(future.result().output, max_elements=10_000)
    expected = local_experts.run(2, {5: hidden[:3], 6: hidden[3:]})
    assert torch.equal(out, torch.cat([expected[5], expected[6]]))


@pytest.fixture(scope="module")
def token_worker(tiny_ckpt, local):
    fingerprint, local_experts = local
    with ConfiguredWorker(ShardConfig(model=tiny_ckpt), ServerConfig(listen="127.0.0.1:0", grace_s=2.0,
                                                                      token=TOKEN)) as w:
        client = WorkerClient(w.address, fingerprint, ClientConfig(token=TOKEN, **FAST))
        assert client.assign(HOSTED) == HOSTED
        _check_remote_equals_local(client, local_experts)  # leaves experts 5 and 6 in layer 2's two slots
        client.close()
        yield w


def test_right_token_works(token_worker, local):
    fingerprint, local_experts = local
    client = WorkerClient(token_worker.address, fingerprint, ClientConfig(token=TOKEN, **FAST))
    assert client.is_serving()
    info = client.info()
    assert info.fingerprint == fingerprint and info.hosted == HOSTED
    before = token_worker.shard.stats()
    _check_remote_equals_local(client, local_experts)
    assert token_worker.shard.stats().requests == before.requests + 1
    assert client.stats().requests == before.requests + 1
    client.close()


BAD_CREDENTIALS = {
    "missing": None,
    "wrong": "Bearer wrong",
    "empty": "Bearer ",
    "no scheme": TOKEN,
    "other case": f"Bearer {TOKEN.upper()}",
    "prefix": f"Bearer {TOKEN[:-1]}",
    "longer": f"Bearer {TOKEN}x",
}


@pytest.mark.parametrize("credential", sorted(BAD_CREDENTIALS))
def test_wrong_or_missing_token_is_refused_before_any_work(token_worker, local, credential):
    fingerprint, _ = local
    value = BAD_CREDENTIALS[credential]
    metadata = ((AUTH_METADATA_KEY, value),) if value is not None else None
    channel = grpc.insecure_channel(token_worker.address)
    stub, health = pb_grpc.ExpertServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    shard = token_worker.shard
    stats, hosted = shard.stats(), shard.hosted
    hidden = pb.Tensor(data=bytes(5 * 32 * 4), dtype="float32", shape=[5, 32])
    calls = {  # each of these would do work (or tell something) for the right token
        "Info": (stub.Info, pb.InfoRequest()),
        "Assign": (stub.Assign, pb.AssignRequest(fingerprint=fingerprint, experts=[pb.ExpertId(layer=0, expert=1)])),
        "RunExperts": (stub.RunExperts, pb.RunExpertsRequest(fingerprint=fingerprint, layer=2, experts=[5, 6],
                                                             counts=[3, 2], hidden=hidden)),
        "Prefetch": (stub.Prefetch, pb.PrefetchRequest(fingerprint=fingerprint, layer=2, experts=[7])),
        "Stats": (stub.Stats, pb.StatsRequest()),
        "Check": (health.Check, health_pb2.HealthCheckRequest(service="")),
    }
    for name, (method, request) in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=5, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, f"{name}: {err.value.code()}"
    with pytest.raises(grpc.RpcError) as err:  # the streaming health method too
        next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5, metadata=metadata))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    assert shard.stats() == stats  # no request, token, load, prefetch, compute time or error counted
    assert shard.hosted == hosted and shard.backend.store.resident_bytes == len(HOSTED) * shard.expert_bytes


def test_undecodable_request_without_token_is_unauthenticated(token_worker):
    channel = grpc.insecure_channel(token_worker.address)
    send = channel.unary_unary("/moeshard.v1.ExpertService/Info", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        send(b"\xff\xff\xff", timeout=5)  # not a protobuf message, and no token
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, f"{err.value.code().name}: {err.value.details()}"


def test_worker_client_without_the_token_is_refused(token_worker, local):
    fingerprint, _ = local
    for cfg in (ClientConfig(**FAST), ClientConfig(token="not-it", **FAST)):
        client = WorkerClient(token_worker.address, fingerprint, cfg)
        assert not client.is_serving()
        with pytest.raises(grpc.RpcError) as err:
            client.info()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in err.value.details()
        client.close()


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.7:50051", "worker.example:50051"])
def test_listening_off_loopback_needs_a_token(listen):
    with pytest.raises(ValueError, match="token"):
        ServerConfig(listen=listen)
    with pytest.raises(ValueError, match="token"):
        ServerConfig(listen=listen, token="")
    assert ServerConfig(listen=listen, token=TOKEN).token == TOKEN


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0", "127.0.0.2:50051"])
def test_loopback_needs_no_token(listen):
    assert ServerConfig(listen=listen).token is None


def test_tls_needs_both_certificate_and_key(pki):
    cert, key = pki["server"]
    with pytest.raises(ValueError, match="both"):
        ServerConfig(listen="127.0.0.1:0", tls_cert=cert)
    with pytest.raises(ValueError, match="both"):
        ServerConfig(listen="127.0.0.1:0", tls_key=key)


# -- TLS --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_worker(tiny_ckpt, pki):
    cert, key = pki["server"]
    cfg = ServerConfig(listen="127.0.0.1:0", grace_s=2.0, token=TOKEN, tls_cert=cert, tls_key=key)
    with ConfiguredWorker(ShardConfig(model=tiny_ckpt), cfg) as w:
        yield w


def test_tls_round_trip_computes_experts_exactly(tls_worker, pki, local):
    fingerprint, local_experts = local
    client = WorkerClient(tls_worker.address, fingerprint, ClientConfig(tls_ca=pki["ca"], token=TOKEN, **FAST))
    assert client.is_serving()
    assert client.assign(HOSTED) == HOSTED
    _check_remote_equals_local(client, local_experts)
    client.close()
    port = tls_worker.address.rsplit(":", 1)[1]
    by_name = WorkerClient(f"localhost:{port}", fingerprint, ClientConfig(tls_ca=pki["ca"], token=TOKEN, **FAST))
    assert by_name.info().fingerprint == fingerprint  # the DNS name in the certificate verifies too
    by_name.close()


def test_tls_does_not_replace_the_token(tls_worker, pki, local):
    fingerprint, _ = local
    client = WorkerClient(tls_worker.address, fingerprint, ClientConfig(tls_ca=pki["ca"], token="wrong", **FAST))
    with pytest.raises(grpc.RpcError) as err:
        client.info()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client.close()


@pytest.mark.parametrize("client_side", ["plaintext", "other CA"])
def test_tls_worker_refuses_plaintext_and_untrusted_clients(tls_worker, pki, local, client_side):
    fingerprint, _ = local
    tls_ca = None if client_side == "plaintext" else pki["other_ca"]
    client = WorkerClient(tls_worker.address, fingerprint, ClientConfig(tls_ca=tls_ca, token=TOKEN, **FAST))
    before = tls_worker.shard.stats()
    assert not client.is_serving()
    for call in (client.info, lambda: client.assign([ExpertKey(0, 1)]), client.stats):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_worker.shard.stats() == before
    client.close()


def test_certificate_for_another_host_is_refused(tiny_ckpt, pki, local):
    fingerprint, _ = local
    cert, key = pki["elsewhere"]  # signed by the trusted CA, but not for 127.0.0.1 or localhost
    cfg = ServerConfig(listen="127.0.0.1:0", grace_s=2.0, token=TOKEN, tls_cert=cert, tls_key=key)
    with ConfiguredWorker(ShardConfig(model=tiny_ckpt), cfg) as w:
        client = WorkerClient(w.address, fingerprint, ClientConfig(tls_ca=pki["ca"], token=TOKEN, **FAST))
        with pytest.raises(grpc.RpcError) as err:
            client.info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()


@pytest.mark.parametrize("side", ["plaintext", "another CA", "wrong token", "no token"])
def test_a_misconfigured_coordinator_is_told_what_to_fix(tls_worker, pki, tiny_ckpt, side):
    """Plaintext to a TLS worker, a CA that did not sign its certificate, a wrong token: one clear error at start,
    naming the fix, not a worker 'down' (or a timeout)."""
    from moeshard.coordinator.cluster import ClusterConfig, ClusterError, join_workers
    from moeshard.coordinator.placement import ClusterSpec

    client = {"plaintext": ClientConfig(token=TOKEN), "another CA": ClientConfig(tls_ca=pki["other_ca"], token=TOKEN),
              "wrong token": ClientConfig(tls_ca=pki["ca"], token="not-" + TOKEN),
              "no token": ClientConfig(tls_ca=pki["ca"], token=None)}[side]
    expected = {"plaintext": "probably speaks TLS: pass --tls-ca", "another CA": "not signed by --tls-ca",
                "wrong token": "refused this coordinator's token: it is not the worker's --token",
                "no token": "requires a token and this coordinator has none"}[side]
    with load_model(tiny_ckpt, slots_per_layer=2, prefetch=0) as om:
        with pytest.raises(ClusterError, match=expected):
            join_workers(om, ClusterConfig(ClusterSpec((tls_worker.address,)), client))


@pytest.mark.slow  # a coordinator process
def test_a_failed_handshake_is_one_clear_line_without_grpcs_own(tls_worker, pki, tiny_tok_ckpt, tmp_path):
    """Issue 21.7: gRPC's core printed its own 'Handshake failed' line before moeshard's error."""
    import os
    import subprocess
    import sys

    ca = tmp_path / "other.pem"
    ca.write_bytes(pki["other_ca"])
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"} | {"MOESHARD_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-c", "import sys; from moeshard.cli import main; sys.exit(main())",
                           "generate", "--prompt", "x", "--model", str(tiny_tok_ckpt), "--workers", tls_worker.address,
                           "--tls-ca", str(ca), "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "the TLS handshake failed" in done.stderr
    assert "Handshake failed" not in done.stderr and "ssl_transport_security" not in done.stderr, done.stderr
