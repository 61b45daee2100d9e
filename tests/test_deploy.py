"""deploy/: every moe-worker and moe-coordinator command in the deployment files is one the real CLIs accept.

Commands are taken from the compose file, the systemd unit (expanded with its env file), the Dockerfile,
the per-GPU script (its dry run, and a real run with a stand-in worker) and the example cluster files,
placeholders are filled with plausible values, and each command goes through the CLIs' own argparse
parsers with abbreviations turned off, so a misspelled or shortened flag fails the test with its line.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from moeshard.benchmarks.cli import add_bench_command
from moeshard.coordinator import cli as coordinator_cli
from moeshard.coordinator.placement import ClusterSpec
from moeshard.worker import cli as worker_cli
from moeshard.worker.server import ServerConfig, WorkerServer
from moeshard.worker.shard import ShardConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "workers-per-gpu.sh"

# Plausible values for the placeholders that deployment files leave to the user.
PLAUSIBLE = {"MOESHARD_TOKEN": "3f9c2a7e5b1d4c8f", "MOESHARD_API_KEY": "9d2e4f6a8b0c1e3f",
             "MOESHARD_MODEL_DIR": "/srv/models/Mixtral-8x7B"}


# --- helpers ----------------------------------------------------------------------------------------------

def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No prefix matching: `--slots` must not pass for `--slots-per-layer` in a file users copy."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


def coordinator_parser() -> argparse.ArgumentParser:
    """moe-coordinator's parser as its entry point builds it (the coordinator's commands plus bench)."""
    parser, commands = coordinator_cli.build_parser()
    add_bench_command(commands)
    return parser


PARSERS = {"moe-worker": worker_cli.build_parser, "moe-coordinator": coordinator_parser}


def parse_command(argv: list[str], where: str) -> tuple[str, argparse.Namespace]:
    """(program, parsed args) for a moe-worker / moe-coordinator command line; any error fails the test."""
    program = Path(argv[0]).name if argv else ""
    if program not in PARSERS:
        pytest.fail(f"{where}: {shlex.join(argv)!r} does not run moe-worker or moe-coordinator")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = _strict(PARSERS[program]()).parse_args(argv[1:])
    except SystemExit:
        reason = err.getvalue().strip().splitlines()
        pytest.fail(f"{where}: `{shlex.join(argv)}` is refused by {program}: {reason[-1] if reason else 'exit'}")
    return program, args


_PLACEHOLDER = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def substitute(text: str, values: dict[str, str]) -> str:
    """Fill ${VAR}, ${VAR:-default}, ${VAR:?message} and $VAR as compose does ($$ is a literal $)."""
    def fill(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        if name in values:
            return values[name]
        if m.group(2) in ("-", ":-"):
            return m.group(3)
        raise AssertionError(f"{text!r}: no plausible value for ${name}; add one to PLAUSIBLE in this test")
    return _PLACEHOLDER.sub(fill, text)


def check_worker_config(args: argparse.Namespace, env_token: str | None, where: str) -> None:
    """The worker's own config checks: HOST:PORT, a token off loopback, TLS cert and key together, format flags
    only with --model."""
    try:
        ServerConfig(listen=args.listen, grace_s=args.grace, token=args.token or env_token,
                     tls_cert=b"pem" if args.tls_cert else None, tls_key=b"pem" if args.tls_key else None)
        worker_cli.check_format_flags(args)
    except ValueError as exc:
        pytest.fail(f"{where}: moe-worker would refuse to start: {exc}")


def cluster_of(args: argparse.Namespace) -> ClusterSpec:
    """The cluster a parsed coordinator command names, read the way the coordinator reads it."""
    assert bool(args.workers) != bool(args.cluster), "give the coordinator --workers or --cluster, not both"
    if args.cluster:
        return ClusterSpec.from_file(args.cluster)
    return ClusterSpec.from_addresses(args.workers, args.local_share, args.replicas)


def seconds(text: str) -> float:
    """systemd / compose durations: 40, 40s, 1min, 1m30s, 20m."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts and all(u in units for _, u in parts), f"cannot read duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- compose ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module", params=[{}, {"EXPERT_BITS": "3", "ATTN_BITS": "4"}], ids=["defaults", "quantized"])
def compose_commands(compose, request) -> dict[str, tuple[str, argparse.Namespace]]:
    """Each service's command, parsed, with the optional settings left at their defaults or set."""
    parsed = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        assert isinstance(command, list), f"compose.yaml: {name}.command should be a YAML list (exec form)"
        argv = [substitute(str(word), {**PLAUSIBLE, **request.param}) for word in command]
        parsed[name] = parse_command(argv, f"compose.yaml: services.{name}.command")
    return parsed


def test_compose_commands_are_accepted_by_the_clis(compose_commands):
    programs = sorted(program for program, _ in compose_commands.values())
    assert programs == ["moe-coordinator", "moe-worker", "moe-worker"], programs
    for name, (program, args) in compose_commands.items():
        if program == "moe-worker":
            check_worker_config(args, PLAUSIBLE["MOESHARD_TOKEN"], f"compose.yaml: {name}")
        else:
            assert args.command == "serve", f"compose.yaml: {name} should run `moe-coordinator serve`"


def test_compose_coordinator_reaches_exactly_its_workers(compose, compose_commands):
    workers = {name: args for name, (program, args) in compose_commands.items() if program == "moe-worker"}
    [(name, coord)] = [(n, args) for n, (program, args) in compose_commands.items() if program == "moe-coordinator"]
    spec = cluster_of(coord)
    assert spec.placement is None, "compose.yaml: balanced placement over the listed workers"
    expected = {f"{w}:{args.listen.rpartition(':')[2]}" for w, args in workers.items()}
    assert set(spec.workers) == expected, f"compose.yaml: {name} --workers should name every worker service"
    for w, args in workers.items():
        assert args.listen.startswith("0.0.0.0:"), f"compose.yaml: {w} must listen on the compose network"
        assert compose["services"][name]["depends_on"][w] == {"condition": "service_healthy"}
        # The workers receive the coordinator's experts, in its format: they name neither a model nor a format.
        assert args.model is None and (args.expert_bits, args.expert_group, args.dtype) == (None, None, None), w


def test_compose_publishes_only_the_api_on_loopback(compose, compose_commands):
    for name, (program, args) in compose_commands.items():
        ports = compose["services"][name].get("ports", [])
        if program == "moe-worker":
            assert not ports, f"compose.yaml: worker {name} must not publish ports"
        else:
            assert args.host == "0.0.0.0" and ports == [f"127.0.0.1:{args.port}:{args.port}"], ports


def test_compose_token_api_key_and_model_mount(compose, compose_commands, monkeypatch):
    from moeshard.coordinator.http_security import serve_config

    for name, (program, args) in compose_commands.items():
        service = compose["services"][name]
        assert service["environment"]["MOESHARD_TOKEN"].startswith("${MOESHARD_TOKEN:?"), \
            f"compose.yaml: {name} must require MOESHARD_TOKEN from the environment"
        assert args.token is None, f"compose.yaml: {name} puts the token on its command line (visible in ps)"
        volumes = [substitute(v, PLAUSIBLE) for v in service["volumes"]]
        if program == "moe-worker":  # no copy of the model: its experts are sent by the coordinator
            assert not any(v.endswith(":ro") for v in volumes), f"compose.yaml: {name} mounts a model it never reads"
            continue
        model = [v for v in volumes if v.split(":")[1] == str(args.model)]
        assert len(model) == 1 and model[0].endswith(":ro"), f"compose.yaml: {name} needs --model mounted :ro"
        assert service["environment"]["MOESHARD_API_KEY"].startswith("${MOESHARD_API_KEY:?") and args.api_key is None
        monkeypatch.setenv("MOESHARD_API_KEY", PLAUSIBLE["MOESHARD_API_KEY"])
        assert serve_config(args).api_key  # 0.0.0.0 with the key from the environment: it starts


def test_compose_stop_grace_exceeds_worker_drain(compose, compose_commands):
    for name, (program, args) in compose_commands.items():
        if program == "moe-worker":
            assert seconds(compose["services"][name]["stop_grace_period"]) > args.grace


def _healthcheck_script(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return substitute(test[3], {})


def test_compose_coordinator_healthcheck_asks_its_health_endpoint(compose, compose_commands):
    for name, (program, args) in compose_commands.items():
        script = _healthcheck_script(compose["services"][name])
        compile(script, f"compose.yaml: {name}.healthcheck", "exec")
        if program == "moe-coordinator":
            assert f"http://127.0.0.1:{args.port}/health" in script


@pytest.fixture
def token_worker():
    """A real worker gRPC server (token interceptor, health service) on 127.0.0.1:0, NOT_SERVING as it is
    before its checkpoint is loaded; `set_health` flips it as loading would."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = WorkerServer(ShardConfig(model=Path("unused")), ServerConfig(listen="127.0.0.1:0", token="right"))

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    address = call(server.start())
    yield address, lambda status: call(server.health.set("", status))
    call(server.stop(0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def _run_healthcheck(script: str, token: str, monkeypatch) -> int:
    monkeypatch.setenv("MOESHARD_TOKEN", token)
    try:
        exec(compile(script, "healthcheck", "exec"), {})
    except SystemExit as exc:
        return int(exc.code or 0)
    except grpc.RpcError:  # uncaught, it makes the real `python -c` exit 1
        return 1
    return 0


def test_compose_worker_healthcheck_passes_only_when_serving_with_the_token(compose, compose_commands,
                                                                            token_worker, monkeypatch):
    from grpc_health.v1 import health_pb2

    address, set_health = token_worker
    for name, (program, args) in compose_commands.items():
        if program != "moe-worker":
            continue
        script = _healthcheck_script(compose["services"][name])
        target = f"127.0.0.1:{args.listen.rpartition(':')[2]}"
        assert f"'{target}'" in script, f"compose.yaml: {name} healthcheck should probe {target}"
        script = script.replace(f"'{target}'", repr(address))
        assert _run_healthcheck(script, "right", monkeypatch) != 0, "healthy before the checkpoint is loaded"
        set_health(health_pb2.HealthCheckResponse.SERVING)
        assert _run_healthcheck(script, "right", monkeypatch) == 0
        assert _run_healthcheck(script, "wrong", monkeypatch) != 0
        set_health(health_pb2.HealthCheckResponse.NOT_SERVING)


# --- Dockerfile -------------------------------------------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_runs_a_cli_as_non_root_and_installs_every_package(compose):
    instructions = _dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert "ENTRYPOINT" not in keywords, "no ENTRYPOINT: compose's command: must choose the program"
    users = [v for k, v in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0") and keywords.index("USER") > max(
        i for i, k in enumerate(keywords) if k == "RUN"), "the image must end as a non-root USER after the last RUN"
    (cmd,) = [json.loads(v) for k, v in instructions if k == "CMD"]
    parse_command(cmd, "Dockerfile: CMD")
    # [tool.setuptools.package-dir]: every folder an installed package comes from (read with a regex: tomllib
    # needs Python 3.11)
    section = re.search(r"^\[tool\.setuptools\.package-dir\]\n((?:.+\n)+)", (ROOT / "pyproject.toml").read_text(), re.M)
    folders = set(re.findall(r'=\s*"(\w+)"', section.group(1)))
    copied = {Path(v.split()[0]).name for k, v in instructions if k == "COPY"}
    assert folders and folders <= copied, f"Dockerfile does not COPY {folders - copied}"
    for service in compose["services"].values():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


# --- systemd ----------------------------------------------------------------------------------------------

def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}, continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: cannot read line {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Za-z_]\w*", key), f"{path.name}: cannot read line {line!r}"
            env[key] = value.strip().strip("\"'")
    return env


def systemd_argv(exec_start: str, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd expands it: $VAR alone splits into words, ${VAR} is substituted in place."""
    argv = []
    for word in shlex.split(exec_start):
        whole = re.fullmatch(r"\$(\w+)", word)
        try:
            if whole:
                argv += env[whole.group(1)].split()
            else:
                argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
        except KeyError as exc:
            pytest.fail(f"moe-worker.service: ExecStart uses {exc} but neither Environment= nor the env file sets it")
    return argv


@pytest.fixture(scope="module")
def unit():
    return _unit(DEPLOY / "systemd" / "moe-worker.service")


@pytest.fixture(scope="module")
def unit_env(unit) -> dict[str, str]:
    env = {}
    for key, value in unit["Service"]:
        if key == "Environment":
            env.update(word.partition("=")[::2] for word in shlex.split(value))
    env.update(_env_file(DEPLOY / "systemd" / "moe-worker.env"))  # EnvironmentFile= overrides Environment=
    return env


@pytest.mark.parametrize("override", [{}, {"TLS_ARGS": ""}, {"EXTRA_ARGS": "--store disk --allow-model-switch"},
                                      {"MODEL_ARGS": "--model /srv/m --expert-bits 3 --expert-group 64"}],
                         ids=["as-shipped", "plaintext", "extra-args", "own-copy"])
def test_systemd_exec_start_is_accepted_by_moe_worker(unit, unit_env, override):
    service = dict(unit["Service"])
    env = {**unit_env, **override}
    argv = systemd_argv(service["ExecStart"], env)
    assert argv[0].startswith("/") and argv[0].endswith("/moe-worker"), argv[0]
    _, args = parse_command(argv, "moe-worker.service: ExecStart")
    assert args.token is None, "the token belongs in the env file, not on the command line"
    assert env.get("MOESHARD_TOKEN"), "moe-worker.env must set MOESHARD_TOKEN"
    check_worker_config(args, env["MOESHARD_TOKEN"], "moe-worker.service")
    assert seconds(service["TimeoutStopSec"]) > args.grace, "TimeoutStopSec must exceed moe-worker --grace"


def test_systemd_service_restarts_drains_and_is_confined(unit, unit_env):
    service = dict(unit["Service"])
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["User"] not in ("", "root", "0")
    assert service["NoNewPrivileges"] in ("yes", "true")
    assert service["PrivateTmp"] in ("yes", "true")
    assert service["ProtectSystem"] == "strict"
    assert unit_env["MOESHARD_CACHE_DIR"] in service["ReadWritePaths"].split(), \
        "ReadWritePaths must include MOESHARD_CACHE_DIR, the only place the worker writes"
    assert service["EnvironmentFile"].endswith("/moe-worker.env")
    assert "PrivateDevices" not in service, "PrivateDevices hides the GPUs"


# --- workers-per-gpu.sh -----------------------------------------------------------------------------------

def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MOESHARD_TOKEN", "GPUS", "HOST", "MODEL")}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def dry_run_commands(out: str) -> tuple[list[list[str]], str]:
    """(the moe-worker command lines, the --workers line) printed by a dry run."""
    commands, workers = [], None
    for line in out.splitlines():
        words = shlex.split(line)
        if words[:1] == ["--workers"]:
            workers = line
        elif words:
            cut = next((i for i, w in enumerate(words) if w.startswith(">")), len(words))
            commands.append(words[:cut])
    assert workers is not None, f"no --workers line in {out!r}"
    return commands, workers


def check_printed_workers(line: str, listens: list[str], where: str) -> None:
    _, args = parse_command(["moe-coordinator", "serve", *shlex.split(line)], where)
    assert list(cluster_of(args).workers) == listens


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_script_dry_run_starts_one_worker_per_listed_gpu():
    result = run_script("start", env={"DRY_RUN": "1", "GPUS": "0,1", "MODEL": "/srv/models/m", "MEMORY": "20GiB",
                                      "EXPERT_BITS": "3"})
    assert result.returncode == 0, result.stderr
    commands, workers = dry_run_commands(result.stdout)
    assert len(commands) == 2
    for gpu, argv in enumerate(commands):
        _, args = parse_command(argv, f"workers-per-gpu.sh dry run, GPU {gpu}")
        check_worker_config(args, None, f"workers-per-gpu.sh GPU {gpu}")
        assert (args.device, args.listen, str(args.model), args.memory, args.expert_bits) == (
            f"cuda:{gpu}", f"127.0.0.1:{50051 + gpu}", "/srv/models/m", 20 * 2**30, 3)
    assert "--expert-bits 3" in result.stderr, "the coordinator must be told to use the same bits"
    check_printed_workers(workers, ["127.0.0.1:50051", "127.0.0.1:50052"], "workers-per-gpu.sh --workers")


def test_script_workers_without_a_model_receive_it():
    result = run_script("start", env={"DRY_RUN": "1", "GPUS": "1", "MEMORY": "20GiB"})
    assert result.returncode == 0, result.stderr
    (argv,), _ = dry_run_commands(result.stdout)
    _, args = parse_command(argv, "workers-per-gpu.sh dry run without MODEL")
    check_worker_config(args, None, "workers-per-gpu.sh without MODEL")
    assert args.model is None and args.expert_bits is None
    refused = run_script("start", env={"DRY_RUN": "1", "GPUS": "1", "EXPERT_BITS": "3"})
    assert refused.returncode == 2 and "EXPERT_BITS applies with MODEL" in refused.stderr


def test_script_counts_gpus_with_nvidia_smi_and_keeps_the_token_off_the_command_line(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 9\n"
                    + "".join(f"echo 'GPU {i}: NVIDIA RTX 3090 (UUID: GPU-{i}abc)'\n" for i in range(3)))
    fake.chmod(0o755)
    env = {"DRY_RUN": "1", "HOST": "0.0.0.0", "ADVERTISE": "gpu-box.lan", "MOESHARD_TOKEN": "s3cret-token",
           "EXTRA_ARGS": "--store disk --disk 200GiB", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = run_script("start", env=env)
    assert result.returncode == 0, result.stderr
    assert "s3cret-token" not in result.stdout + result.stderr
    commands, workers = dry_run_commands(result.stdout)
    for gpu, argv in enumerate(commands):
        _, args = parse_command(argv, f"workers-per-gpu.sh dry run, GPU {gpu}")
        check_worker_config(args, "s3cret-token", f"workers-per-gpu.sh GPU {gpu}")
        assert (args.device, args.listen, args.store) == (f"cuda:{gpu}", f"0.0.0.0:{50051 + gpu}", "disk")
    assert len(commands) == 3
    check_printed_workers(workers, [f"gpu-box.lan:{50051 + g}" for g in range(3)], "workers-per-gpu.sh --workers")


@pytest.mark.parametrize("env, message", [({"HOST": "0.0.0.0", "GPUS": "0"}, "MOESHARD_TOKEN"),
                                          ({"GPUS": "0,x"}, "GPUS=0,x"),
                                          ({"GPUS": "0", "BASE_PORT": "high"}, "BASE_PORT")])
def test_script_refuses_bad_settings(env, message):
    result = run_script("start", env={"DRY_RUN": "1", **env})
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    yield path
    for pid_file in path.glob("worker-*.pid"):  # whatever a failed test left running, by pid
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.slow  # real worker processes
def test_script_starts_and_stops_workers(tmp_path, run_dir):
    fake = tmp_path / "moe-worker"  # stands in for the real one: records how it was started, then waits
    fake.write_text("""#!/usr/bin/env bash
printf '%s\\n' "$@" >"$ARGV_DIR/$$.argv"
printf '%s' "${MOESHARD_TOKEN:-}" >"$ARGV_DIR/$$.token"
while (($#)); do
    case $1 in --ready-file) ready=$2; shift ;; --listen) listen=$2; shift ;; esac
    shift
done
trap 'exit 0' TERM
printf '%s' "$listen" >"$ready"
while :; do sleep 0.05; done
""")
    fake.chmod(0o755)
    argv_dir = tmp_path / "argv"
    argv_dir.mkdir()
    env = {"MOE_WORKER": str(fake), "RUN_DIR": str(run_dir), "GPUS": "0,2", "ARGV_DIR": str(argv_dir),
           "MOESHARD_TOKEN": "tok", "WAIT_S": "20"}
    started = run_script("start", env=env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "--workers 127.0.0.1:50051,127.0.0.1:50053"
    pids = [int((run_dir / f"worker-{gpu}.pid").read_text()) for gpu in (0, 2)]
    for pid in pids:
        argv = (argv_dir / f"{pid}.argv").read_text().splitlines()
        parse_command(["moe-worker", *argv], f"workers-per-gpu.sh start, pid {pid}")
        assert (argv_dir / f"{pid}.token").read_text() == "tok"
    assert run_script("status", env=env).returncode == 0
    again = run_script("start", env=env)
    assert again.returncode == 2 and "already running" in again.stderr
    stopped = run_script("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(run_dir.glob("worker-*.pid"))
    assert run_script("status", env=env).returncode != 0


# --- cluster files and README -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cluster.example.json", "cluster.explicit.example.json"])
def test_example_cluster_files_load_through_the_cli(name):
    _, args = parse_command(["moe-coordinator", "serve", "--cluster", str(DEPLOY / name)], f"deploy/{name}")
    spec = cluster_of(args)
    ClusterSpec.from_addresses(",".join(spec.workers))  # every address is HOST:PORT
    raw = json.loads((DEPLOY / name).read_text())
    assert set(raw) <= {"workers", "local_share", "replicas"}, "keys the loader would silently ignore"
    listed = ["experts" in w for w in raw["workers"]]
    if spec.placement is None:
        assert 0.0 <= spec.local_share <= 1.0 and 1 <= spec.replicas <= len(spec.workers)
    else:
        # With any explicit list, placement is explicit for the whole file: a worker without one would idle.
        assert all(listed), f"deploy/{name}: list experts for every worker or for none"
        assert {a for owners in spec.placement.values() for a in owners} == set(spec.workers)
        assert "local_share" not in raw and "replicas" not in raw, "ignored with explicit placement"


def test_readme_describes_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.name in readme, f"deploy/README.md does not mention {path.relative_to(DEPLOY)}"
