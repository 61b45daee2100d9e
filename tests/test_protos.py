"""The committed generated gRPC code is what protos/expert.proto generates (CI fails on a stale copy)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "protos/expert.proto"],
                   cwd=ROOT, check=True, timeout=120)
    for name in ("expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (ROOT / "protos" / name).read_text(), (
            f"protos/{name} is stale: run python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. "
            "--grpc_python_out=. protos/expert.proto")
