"""Regenerate the committed gRPC code: `python -m moeshard.protos.generate` (needs grpcio-tools, a dev extra).

protoc sees `protos/expert.proto` as `moeshard/protos/expert.proto` (a virtual include path), so the generated
modules import each other as `moeshard.protos...`, the name they are installed under, with no fix-ups.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into `out_dir`; returns their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-Imoeshard/protos={HERE}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", "moeshard/protos/expert.proto"]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {HERE / 'expert.proto'}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(Path(tmp) / "moeshard" / "protos" / name, out_dir / name)) for name in GENERATED]


def main() -> int:
    for path in generate(HERE):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
