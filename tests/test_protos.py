"""The committed generated gRPC code is what protos/expert.proto generates (CI fails on a stale copy)."""
from pathlib import Path

from moeshard.protos.generate import GENERATED, generate

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path):
    generate(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (ROOT / "protos" / name).read_text(), (
            f"protos/{name} is stale: run python -m moeshard.protos.generate")
