"""Who may talk to a moeshard program, shared by both (the coordinator's HTTP API and its workers' gRPC): the
credentials' environment variables, loopback (where no credentials are needed), and gRPC core's own logging.
This module and `offload_core.settings` are the only readers of the environment."""
from __future__ import annotations

import ipaddress
import os

TOKEN_ENV = "MOESHARD_TOKEN"  # shared secret between a coordinator and its workers
API_KEY_ENV = "MOESHARD_API_KEY"  # the key HTTP clients of `serve` must send (Authorization: Bearer <key>)
GRPC_VERBOSITY_ENV = "GRPC_VERBOSITY"  # gRPC core's own log level (its lines bypass Python's logging)


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def quiet_grpc_core() -> None:
    """gRPC's C core prints its own lines (a failed TLS handshake at INFO, before our clear error): keep errors
    only, unless the user chose a level. Call before grpc is imported."""
    os.environ.setdefault(GRPC_VERBOSITY_ENV, "ERROR")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is this machine only: listening there needs no credentials."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
