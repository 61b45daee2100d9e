"""Cluster files and --workers strings: what is accepted, and the errors for what is not."""
import json

import pytest

from moeshard.coordinator.placement import ClusterError, ClusterSpec
from moeshard.offload_core import ExpertKey


def write(tmp_path, data) -> str:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_balanced_file(tmp_path):
    spec = ClusterSpec.from_file(write(tmp_path, {"workers": [{"address": "10.0.0.2:50051"},
                                                              {"address": "gpu-box:50052"}],
                                                  "local_share": 0.25, "replicas": 2}))
    assert spec.workers == ("10.0.0.2:50051", "gpu-box:50052")
    assert spec.placement is None and spec.local_share == 0.25 and spec.replicas == 2


def test_explicit_file_with_a_replica(tmp_path):
    spec = ClusterSpec.from_file(write(tmp_path, {"workers": [
        {"address": "a:1", "experts": [[0, 1], [0, 2]]}, {"address": "b:1", "experts": [[0, 2]]}]}))
    assert spec.placement == {ExpertKey(0, 1): ("a:1",), ExpertKey(0, 2): ("a:1", "b:1")}


@pytest.mark.parametrize("data, message", [
    ("{not json", "cannot read cluster file"),
    ({"worker": [{"address": "a:1"}]}, 'expected {"workers"'),
    ({"workers": [{"address": "a:1"}], "replica": 2}, r"unknown keys \['replica'\]"),
    ({"workers": [{"address": "a"}]}, "worker address 'a': expected HOST:PORT"),
    ({"workers": [{"address": "a:99999"}]}, "expected HOST:PORT"),
    ({"workers": [{"address": "a:1", "experts": [[0, 1]]}, {"address": "b:1"}]}, "either every worker lists"),
    ({"workers": [{"address": "a:1", "experts": [[0, "x"]]}]}, r"experts must be \[\[layer, expert\]"),
    ({"workers": [{"address": "a:1", "experts": [[0, 1]]}], "replicas": 2}, "apply to balanced placement only"),
])
def test_bad_files_say_what_was_expected(tmp_path, data, message):
    with pytest.raises(ClusterError, match=message):
        ClusterSpec.from_file(write(tmp_path, data))


def test_worker_address_list():
    assert ClusterSpec.from_addresses("a:1, b:2").workers == ("a:1", "b:2")
    with pytest.raises(ClusterError, match="expected HOST:PORT"):
        ClusterSpec.from_addresses("a:1,b")
    with pytest.raises(ClusterError, match="--workers is empty"):
        ClusterSpec.from_addresses(" , ")
