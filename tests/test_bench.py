"""`moe-coordinator bench` end to end on a small generated model: every system runs, gives the reference
tokens, and the report has the fields the README's table is built from (no timing is asserted)."""
import json
import os

import pytest

from moeshard.cli import main

FIELDS = {"name", "decode_tok_s", "prefill_tok_s", "hit_rate", "prefetch_recall", "bytes_per_token",
          "floor_s_per_token", "tokens_match_reference"}


@pytest.mark.slow  # every system end to end: ~15 s
def test_bench_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--tokens", "3",
                 "--prompt-tokens", "6", "--warmup", "1", "--repeats", "2", "--workdir", str(tmp_path / "work"),
                 "--json", str(out), "--plot", str(tmp_path / "bench.png"), "--push"])
    assert code == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["runs"]]
    assert names == ["resident", "lru", "lru+prefetch", "naive", "worker", "workers", "hf-eager", "hf-batched_mm",
                     "hf-grouped_mm", "accelerate-offload"]
    for run in report["runs"]:
        assert FIELDS <= set(run)
        assert run["tokens_match_reference"] is True, run["name"]
        spread = run["decode_tok_s_spread"]
        assert spread["n"] == 2 and spread["min"] <= run["decode_tok_s"] <= spread["max"]
    assert report["targets"]["fastest_transformers"].startswith("hf-")
    push = report["push"]
    assert push["bytes"] == report["model"]["total_expert_bytes"] and push["warm_restart_bytes"] == 0
    assert push["push_bytes_s"] > 0 and push["plain_bytes_s"] > 0
    by = {r["name"]: r for r in report["runs"]}
    assert by["workers"]["empty_round_trip_ms"] > 0 and set(by["workers"]["cpu_s_per_token"]) == {
        "coordinator", "worker0", "worker1"}
    assert by["naive"]["hit_rate"] == 0.0 and by["resident"]["hit_rate"] == 1.0
    assert by["lru"]["bytes_per_token"] > 0 and by["resident"]["bytes_per_token"] is None
    cold = report["protocol"]["read_bandwidth_bytes_s"]
    assert cold["cold"] > 0 and cold["warm"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "targets:" in printed and "round 2/2" in printed


@pytest.mark.slow  # a 64-expert top-8 model
def test_bench_many_experts_small(tmp_path):
    out = tmp_path / "many.json"
    code = main(["bench", "--model-kind", "many-experts", "--hidden", "64", "--intermediate", "32", "--layers", "2",
                 "--tokens", "3", "--prompt-tokens", "6", "--warmup", "1", "--repeats", "1",
                 "--systems", "resident,resident@4,resident@4/4,resident@2/4,lru+prefetch,lru+prefetch@4,"
                 "hf-grouped_mm,accelerate-offload,llama.cpp@Q4_0", "--workdir", str(tmp_path / "work"),
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"]["family"] == "qwen3_moe" and report["model"]["num_local_experts"] == 64
    assert report["budget"]["slots_per_layer"] == 16  # a quarter of the experts
    by = {r["name"]: r for r in report["runs"]}
    # unquantized systems give transformers' tokens; quantized ones compute other weights: agreement only
    assert all(by[n]["tokens_match_reference"] for n in ("resident", "lru+prefetch", "hf-grouped_mm"))
    assert by["resident@4/4"]["tokens_match_reference"] is None and 0 <= by["resident@4/4"]["greedy_agreement"] <= 1
    assert (by["resident@4/4"]["expert_bits"], by["resident@4/4"]["attn_bits"]) == (4, 4)
    # the same bytes buy a 4-bit offloaded system more slots than 16 fp32 experts (8x smaller: all 64)
    assert by["lru+prefetch"]["slots_per_layer"] == 16 and by["lru+prefetch@4"]["slots_per_layer"] == 64
    assert by["resident@4"]["memory_floor_s_per_token"] < by["resident"]["memory_floor_s_per_token"]
    assert by["resident@2/4"]["quantize_s_per_layer"] > 0  # its cache was built by this run
    assert {"resident_vs_fastest_transformers", "lru+prefetch_vs_accelerate", "resident_e4_vs_bf16",
            "resident_e4a4_vs_bf16", "resident_e2a4_vs_e4a4", "lru+prefetch_e4_vs_bf16_same_bytes"} <= set(
        report["targets"])
    if "llama.cpp@Q4_0" in report["skipped"]:  # the optional extra is not installed: listed, not an error
        assert "pip install 'moeshard[llamacpp]'" in report["skipped"]["llama.cpp@Q4_0"]
    else:
        assert by["llama.cpp@Q4_0"]["decode_tok_s"] > 0 and "resident_e4_vs_llama.cpp_q4_0" in report["targets"]


@pytest.mark.slow  # two servers, each decoding 1 and 3 streams
def test_bench_concurrency_serves_streams_over_http(tmp_path, capsys):
    out = tmp_path / "concurrency.json"
    code = main(["bench", "--concurrency", "1,3", "--hidden", "64", "--intermediate", "128", "--layers", "2",
                 "--tokens", "6", "--prompt-tokens", "8", "--repeats", "2", "--workdir", str(tmp_path / "work"),
                 "--json", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"resident", "lru+prefetch"} and report["levels"] == [1, 3]
    for name, by_level in report["systems"].items():
        one, three = by_level["1"], by_level["3"]
        assert one["rounds"] == three["rounds"] == 2
        assert one["mean_batch"] == 1.0 and three["mean_batch"] > 1.5, (name, three)
        assert 0 < one["ttft_p50_s"] <= one["ttft_p95_s"] and three["aggregate_tok_s"] > 0
        assert 0 < three["active_fraction"] <= 1
    assert report["systems"]["resident"]["3"]["hit_rate"] == 1.0
    assert report["systems"]["lru+prefetch"]["3"]["bytes_per_step"] > 0
    assert "tok/s together" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_transformers_model_stops_mapping_the_checkpoint_once_it_owns_its_memory(tmp_path):
    """The cold protocol drops offloaded files from the page cache, which the kernel refuses for mapped pages:
    transformers maps the safetensors it loads, so the benchmark copies its models off the map and checks."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from moeshard.benchmarks.protocol import data_files, mapped_files, own_memory

    from .conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")  # its own: other tests' models may map the shared tiny checkpoint
    files = data_files(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert mapped_files(files), "transformers no longer maps what it loads: the check below proves nothing"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    own_memory(model)
    gc.collect()
    assert mapped_files(files) == []
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_shared_prefix_without_concurrency_is_refused(capsys):
    from moeshard.cli import main

    assert main(["bench", "--shared-prefix", "64", "--quiet"]) == 2
    assert "--shared-prefix is a scenario of the concurrency bench: give --concurrency" in capsys.readouterr().err
