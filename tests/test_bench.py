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


# four tiny models, two rounds of three tokens each: ~2 s (plus transformers' import when it runs first)
@pytest.mark.slow
def test_budget_sweep_small(tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["bench", "--budget-sweep", "25%,1.0", "--policies", "lru,global-lru", "--prefetch", "0",
                 "--hidden", "64", "--intermediate", "128", "--layers", "2", "--tokens", "3", "--prompt-tokens", "6",
                 "--warmup", "1", "--repeats", "2", "--workdir", str(tmp_path / "work"), "--json", str(out),
                 "--plot", str(png)])
    assert code == 0
    report = json.loads(out.read_text())
    experts = report["model"]["experts"]  # 2 layers x 8
    assert experts == 16 and report["policies"] == ["lru", "global-lru"]
    by = {(r["policy"], r["fraction"]): r for r in report["runs"]}
    assert set(by) == {("lru", 0.25), ("global-lru", 0.25), ("lru", 1.0), ("global-lru", 1.0)}
    # the bytes buy slots: a quarter of 16 experts is 4, two per layer for per-layer lru, 4 shared for global-lru
    assert by["lru", 0.25]["slots_per_layer"] == 2 and by["global-lru", 0.25]["rows"] == 4
    assert by["lru", 1.0]["slots_per_layer"] == 8 and by["global-lru", 1.0]["rows"] == 16
    for run in report["runs"]:
        assert 0.0 <= run["hit_rate"] <= 1.0 and 0.0 <= run["hit_rate_with_prefill"] <= 1.0
        assert run["rows"] * report["model"]["expert_bytes"] <= run["expert_memory"]
        assert run["tokens_match_reference"] is True, run["name"]  # a cache never changes the tokens
        spread = run["decode_tok_s_spread"]
        assert spread["n"] == 2 and spread["min"] <= run["decode_tok_s"] <= spread["max"]
    for policy in ("lru", "global-lru"):
        full, quarter = by[policy, 1.0], by[policy, 0.25]
        # every expert resident: nothing is ever evicted, so each misses at most once, on its first use
        assert full["misses_since_load"] <= experts and full["bytes_per_token"] <= quarter["bytes_per_token"]
        # without prefetch, whatever hits in a smaller cache was used before, so it is resident in the full one
        assert full["hit_rate"] >= quarter["hit_rate"]
    verdict = report["verdict"]
    assert verdict["fraction"] == 0.25 and verdict["policies"]["lru"]["speed_vs_lru"] == 1.0
    gain = verdict["policies"]["global-lru"]["hit_rate_minus_lru"]
    assert gain == pytest.approx(by["global-lru", 0.25]["hit_rate"] - by["lru", 0.25]["hit_rate"])
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "at the 25% budget" in printed and "global-lru" in printed


@pytest.mark.parametrize("bad, why", [("0", "in (0, 1]"), ("1.5", "in (0, 1]"), ("120%", "in (0, 1]"),
                                      ("0.1,-0.5", "in (0, 1]"), ("nan", "in (0, 1]"), ("many", "expected fractions"),
                                      ("0.5,50%", "lists a budget twice")])
def test_budget_sweep_refuses_a_bad_fraction(bad, why, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", f"--budget-sweep={bad}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --budget-sweep" in err and why in err, err


def test_budget_sweep_fractions_and_policies_parse():
    from moeshard.benchmarks.cli import DEFAULT_SWEEP, parse_fractions, parse_policies

    assert parse_fractions("1,10%, 0.25") == (0.1, 0.25, 1.0)
    assert DEFAULT_SWEEP == (0.1, 0.25, 0.5, 0.75, 1.0)
    assert parse_policies("lru, global-lfru") == ("lru", "global-lfru")
    for bad in ("none", "mru", ""):
        with pytest.raises(ValueError, match="--policies"):
            parse_policies(bad)


def test_budget_sweep_refuses_flags_it_sets_itself(capsys):
    assert main(["bench", "--budget-sweep", "--slots-per-layer", "2", "--quiet"]) == 2
    assert "--budget-sweep sets the memory itself" in capsys.readouterr().err
    assert main(["bench", "--policies", "lru", "--quiet"]) == 2
    assert "give --budget-sweep too" in capsys.readouterr().err


def test_budget_sweep_without_matplotlib_says_which_extra(monkeypatch, tmp_path, capsys):
    import sys

    from moeshard.benchmarks.bench import plot_sweep

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert plot_sweep({}, tmp_path / "sweep.png") is False
    assert "pip install 'moeshard[bench]'" in capsys.readouterr().out and not (tmp_path / "sweep.png").exists()
