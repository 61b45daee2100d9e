"""Every MoE family moeshard supports, against transformers' own model on the same folder: tiny random
checkpoints written by save_pretrained, offloaded (k < E, prefetch on), both host stores, HQQ, two real workers,
GPT-OSS's MXFP4 experts, dense layers between sparse ones, and clear refusals for what moeshard cannot read."""
import copy
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moeshard.cli import main
from moeshard.coordinator.cluster import ClusterConfig, join_workers
from moeshard.coordinator.placement import ClusterSpec
from moeshard.offload_core import CheckpointError, OffloadConfig, QuantConfig, load_model
from moeshard.offload_core.config import DEFAULT_EXPERT_GROUP
from moeshard.offload_core.moe_layer import _ATTR
from moeshard.offload_core.quant import HQQExpertFormat, quantize_attention
from moeshard.worker.shard import ShardConfig

from .conftest import make_checkpoint
from .workers import InProcessWorker
from .families import FAMILIES, make_family_checkpoint, make_mxfp4_gpt_oss

PROMPT = torch.tensor([[1, 17, 42, 5, 33, 23, 61, 9, 30, 44, 100, 7]])
NEW = 32
# Relative error of an expert's weights through HQQ at 3 bits (g64), as measured on Mixtral-shaped experts in
# test_quant.py (0.176-0.185); a family's experts must not lose more.
EXPERT_ERROR_3BIT = 0.22


def generate(model) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


# The fast subset runs three families (the paper's, the most run at home, and the one with sinks, biases and MXFP4);
# the full suite runs all.
FAST_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")


@pytest.fixture(scope="module", params=[pytest.param(f, marks=() if f in FAST_FAMILIES else pytest.mark.slow)
                                        for f in FAMILIES])
def family(request, tmp_path_factory):
    """(name, checkpoint folder, transformers' model, its logits and greedy tokens on PROMPT)."""
    path = make_family_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(PROMPT).logits
    return request.param, path, ref, logits, generate(ref)


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_family_matches_transformers(family, store):
    name, path, ref, ref_logits, ref_tokens = family
    with load_model(path, slots_per_layer=2, prefetch=1, store=store) as om:
        assert om.layout.model_type == name and om.layout.num_experts > 2  # k = 2 slots hold fewer than E
        with torch.no_grad():
            torch.testing.assert_close(om(PROMPT).logits, ref_logits, atol=1e-5, rtol=0)
        tokens = generate(om)
        assert torch.equal(tokens, ref_tokens)
        assert len(set(tokens[0, PROMPT.shape[1]:].tolist())) > 4  # routing and output vary: not a degenerate toy
        stats = om.stats()
        assert sorted(stats.layers) == om.layout.sparse_layers
        assert stats.total.misses > 0 and stats.total.predicted > 0 and stats.backends["local"]["store"] == store


def _fake_quantize(ref, om, bits: int):
    """transformers' model with the weights moeshard computes with at these settings: attention through hqq's
    HQQLinear, each expert through moeshard's HQQ format and back, written into transformers' own parameters."""
    model = copy.deepcopy(ref)
    quantize_attention(model, QuantConfig(attn_bits=4), "cpu")
    fmt = HQQExpertFormat(om.layout.tensors, bits, DEFAULT_EXPERT_GROUP[bits], torch.float32)
    worst = 0.0
    for layer in om.layout.sparse_layers:
        experts = om.layout.experts_module(model, layer)
        for e in range(om.layout.num_experts):
            weights = {t.name: getattr(experts, t.param)[e].detach() for t in om.layout.tensors}
            decoded = fmt.decode(fmt.encode(weights, fmt.layout.empty()))
            for t in om.layout.tensors:
                if not t.is_bias:
                    worst = max(worst, ((decoded[t.name] - weights[t.name]).norm() / weights[t.name].norm()).item())
                getattr(experts, t.param).data[e] = decoded[t.name]
    return model, worst


@pytest.mark.slow  # HQQ on tiny Mixtral is in the fast subset (test_quant)
def test_family_hqq_4_3_equals_transformers_on_the_same_quantized_weights(family, tmp_path):
    name, path, ref, _, _ = family
    with load_model(path, slots_per_layer=2, prefetch=1, cache_dir=tmp_path,
                    quant=QuantConfig(attn_bits=4, expert_bits=3)) as om:
        quantized, worst = _fake_quantize(ref, om, bits=3)
        assert worst < EXPERT_ERROR_3BIT, f"{name}: an expert lost {worst:.3f} of its weights to 3-bit HQQ"
        with torch.no_grad():
            expected = quantized(PROMPT).logits
            torch.testing.assert_close(om(PROMPT).logits, expected, atol=2e-4, rtol=1e-4)
        assert torch.equal(generate(om), generate(quantized))


@pytest.mark.slow  # two gRPC servers per family: ~1 s each, 8 families
def test_family_with_half_the_experts_on_two_workers(family):
    """Two workers (the real gRPC server and shard code, in this process: worker processes are tested in
    test_worker and test_join) compute half of each family's experts."""
    name, path, ref, ref_logits, ref_tokens = family
    shard = ShardConfig(model=path, offload=OffloadConfig(slots_per_layer=2, store="ram", prefetch=0))
    with InProcessWorker(shard) as w0, InProcessWorker(shard) as w1:
        with load_model(path, slots_per_layer=2, prefetch=1) as om:
            cluster = join_workers(om, ClusterConfig(ClusterSpec((w0.address, w1.address), local_share=0.5)))
            placed = len(cluster.placement)
            assert placed == len(om.layout.sparse_layers) * om.layout.num_experts // 2
            with torch.no_grad():
                torch.testing.assert_close(om(PROMPT).logits, ref_logits, atol=1e-5, rtol=0)
            assert torch.equal(generate(om), ref_tokens)
            described = cluster.describe()
            assert all(d["requests"] > 0 and d["failures"] == 0 for d in described.values()), described


@pytest.mark.parametrize("name, dense", [("qwen3_moe", [1]), ("deepseek_v3", [0])])
def test_prefetch_predicts_the_next_sparse_layer(tmp_path, name, dense):
    """Qwen3's mlp_only_layers and DeepSeek's first_k_dense_replace put dense MLPs between sparse layers:
    each sparse layer predicts the next *sparse* one, and only sparse layers are scored."""
    path = make_family_checkpoint(tmp_path / name, name)
    with load_model(path, slots_per_layer=2, prefetch=2) as om:
        sparse = om.layout.sparse_layers
        assert sparse == [i for i in range(om.model.config.num_hidden_layers) if i not in dense]
        nexts = [getattr(om.layout.experts_module(om.model, layer), _ATTR).next_layer for layer in sparse]
        assert nexts == [*sparse[1:], None]
        generate(om)
        layers = om.stats().layers
        assert sorted(layers) == sparse
        assert layers[sparse[0]].predicted == 0  # nothing predicts the first sparse layer
        for layer in sparse[1:]:
            assert layers[layer].predicted > 0 and layers[layer].prefetch_recall > 0.3, (layer, layers[layer])


def test_gpt_oss_mxfp4_experts_equal_transformers_dequantization(tmp_path):
    path = make_mxfp4_gpt_oss(tmp_path / "mxfp4")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # transformers dequantizes on CPU
    with load_model(path, slots_per_layer=2, prefetch=1) as om:
        assert om.layout.quantization == "mxfp4"
        for layer in om.layout.sparse_layers:
            experts = ref.model.layers[layer].mlp.experts
            for e in range(om.layout.num_experts):
                mine = om.layout.read_expert(om.checkpoint, layer, e, torch.float32)
                assert torch.equal(mine["gate_up"], experts.gate_up_proj[e])
                assert torch.equal(mine["down"], experts.down_proj[e])
        assert torch.equal(generate(om), generate(ref))
    with load_model(path, slots_per_layer=2, prefetch=1, cache_dir=tmp_path / "q",
                    quant=QuantConfig(expert_bits=4)) as om:  # MXFP4 re-quantized to 4-bit HQQ
        with torch.no_grad():
            logits, expected = om(PROMPT).logits, ref(PROMPT).logits
        assert ((logits - expected).norm() / expected.norm()).item() < 0.5


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test printed before (save_pretrained's progress bar) is not the CLI's
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err) -> str:
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-coordinator: error: "), err
    return lines[0]


def test_a_family_moeshard_cannot_run_is_one_line(tmp_path, capsys):
    from transformers import AutoConfig

    config = AutoConfig.for_model("dbrx", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                  ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
                                  attn_config={"kv_n_heads": 2, "rope_theta": 10000.0})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    line = _one_line_error(*run_cli(capsys, "info", "--model", str(tmp_path))[::2])
    assert "model_type 'dbrx' is not a Mixture-of-Experts family moeshard can run" in line


@pytest.mark.parametrize("method", ["fp8", "gptq", "awq", "compressed-tensors"])
def test_a_prequantized_format_moeshard_does_not_read_is_one_line(tiny_tok_ckpt, tmp_path, capsys, method):
    folder = shutil.copytree(tiny_tok_ckpt, tmp_path / method)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "weight_block_size": [128, 128], "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"pre-quantized with '{method}'"):
        load_model(folder)
    line = _one_line_error(*run_cli(capsys, "generate", "--model", str(folder), "--prompt", "x", "--quiet")[::2])
    assert f"pre-quantized with '{method}', a format moeshard does not read" in line


def test_info_reports_structure_sizes_and_fit(tmp_path, capsys):
    path = make_family_checkpoint(tmp_path / "qwen2", "qwen2_moe")
    code, out, _ = run_cli(capsys, "info", "--model", str(path), "--memory", "1MiB", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["model_type"] == "qwen2_moe" and report["verified"]
    assert report["moe_layers"] == [0, 1, 2] and report["experts_per_layer"] == 8 and report["top_k"] == 2
    assert report["shared_experts_layers"] == [0, 1, 2]
    D, I = 64, 32
    per_expert_fp32 = (2 * I * D + D * I) * 4  # gate_up [2I, D] and down [D, I]
    assert report["bytes_per_expert"]["16"]["bytes"] == per_expert_fp32
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # fp32: 4 bytes a weight
        dense = sum(math.prod(f.get_slice(n).get_shape()) * 4 for n in f.keys() if ".experts." not in n)
    assert report["dense_bytes"] == dense
    fits = report["fits"]["16"]
    expected_slots = min(8, ((1 << 20) - dense) // (per_expert_fp32 * 3))
    assert fits["slots_per_layer"] == expected_slots and fits["fits"] == (expected_slots >= 1)
    assert report["bytes_per_expert"]["2"]["bytes"] < report["bytes_per_expert"]["8"]["bytes"] < per_expert_fp32
    code, out, _ = run_cli(capsys, "info", "--model", str(path), "--memory", "64MiB")
    assert code == 0 and "every expert resident" in out and "shared experts" in out and "qwen2_moe" in out
    assert "0.00 GiB" not in out and "in 64.00 MiB" in out  # small sizes in a unit that shows them (issue 21.7)


@pytest.mark.slow  # two fresh processes (the Hub's cache location is read at import)
def test_model_given_as_a_hub_repository_id_from_the_local_cache(tmp_path):
    """`--model Org/Name` resolves through huggingface_hub's cache (laid out here by the test), offline."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    snapshot = cache / "models--moeshard-test--tiny-mixtral" / "snapshots" / ("a" * 40)
    make_checkpoint(snapshot)
    (cache / "models--moeshard-test--tiny-mixtral" / "refs").mkdir(parents=True)
    (cache / "models--moeshard-test--tiny-mixtral" / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moeshard", "info", "--model"]
    found = subprocess.run([*cmd, "moeshard-test/tiny-mixtral", "--json"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)
    assert report["model_type"] == "mixtral" and report["path"] == str(snapshot)
    missing = subprocess.run([*cmd, "moeshard-test/not-here"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "'moeshard-test/not-here' is not in the Hugging Face cache" in missing.stderr
    assert "offline (HF_HUB_OFFLINE is set)" in missing.stderr
