"""The bench's llama.cpp system: the GGUF it writes, read back with gguf's reader, and llama.cpp decoding it to
transformers' greedy tokens and logits, for both families (Qwen3-MoE as `qwen3moe`, Mixtral as `llama`).
Tests needing gguf or llama-cpp-python (the optional extra) are skipped, with the reason, without them."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeshard.benchmarks import llamacpp
from moeshard.benchmarks.bench_model import BenchModelSpec, make_bench_checkpoint
from moeshard.benchmarks.llamacpp import INSTALL, LlamaCppModel, missing, quantize, write_gguf

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason=f"gguf is not installed: {INSTALL}")
needs_llama_cpp = pytest.mark.skipif(missing() is not None, reason=str(missing()))

SPECS = {  # small enough for tests, float32 so llama.cpp and transformers compute in the same precision
    "qwen3_moe": BenchModelSpec.of_kind("qwen3-30b-a3b", hidden_size=256, intermediate_size=64,
                                        num_local_experts=8, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=64, dtype="float32"),
    "mixtral": BenchModelSpec.of_kind("mixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=2),
}
EXPERT_NAMES = {"qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
                "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})}
PROMPT = [int(t) for t in torch.randint(3, 4096, (8,), generator=torch.Generator().manual_seed(1))]
STEPS = 16
# The bench's recipe keeps attention's output projections at 1/10 of the usual init, so little of attention
# reaches the logits; the test checkpoints scale them back up (x10) so that an attention mismatch (q/k row
# order, rope style or base) shows: without llama's q/k permutation Mixtral's logits then move by 6.8e-4.
ATTENTION_SCALE = 10.0
# llama.cpp's float32 against transformers' float32 (f32_attention: F32 KV cache, no flash attention): matmuls
# and softmaxes sum in another order (blocked SIMD dot products, ggml's own exp), so logits differ by rounding
# only: measured at most 5.4e-7 on logits of std ~0.3 over 10 random prompts at 4 lengths, both families. 1e-5
# leaves ~20x over rounding and sits 70x under the missing-permutation error above.
LOGITS_ATOL = 1e-5
# llama.cpp's defaults, which the bench runs (F16 KV cache, flash attention): measured at most 5.4e-5 (qwen3_moe)
# and 1.7e-5 (mixtral) on the same prompts; 5e-4 leaves ~10x.
DEFAULT_ATOL = 5e-4
# Q8_0 against F32 (the same llama.cpp): measured at most 0.045 of the logits' std; 0.25 catches a broken file.
Q8_0_REL = 0.25
# One llama.cpp thread: with two on two cores, a core taken by another process stalls llama.cpp's spinning
# barriers (a tiny model's step went from 0.3 ms to 0.4 s while a benchmark ran beside the tests).
THREADS = 1


def scale_attention_output(ckpt: Path, factor: float) -> None:
    for f in ckpt.glob("model-layer*.safetensors"):
        state = load_file(str(f))
        save_file({k: v * factor if k.endswith("o_proj.weight") else v for k, v in state.items()}, str(f))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("llamacpp"), {}
    for family, spec in SPECS.items():
        out[family] = make_bench_checkpoint(folder / family, spec)
        scale_attention_output(out[family], ATTENTION_SCALE)
    return out


@pytest.fixture(scope="module")
def ggufs(checkpoints):
    pytest.importorskip("gguf", reason=f"gguf is not installed: {INSTALL}")
    return {family: write_gguf(ckpt, ckpt.parent / f"{family}-f32.gguf") for family, ckpt in checkpoints.items()}


def state_of(ckpt: Path) -> dict:
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            state.update({name: st.get_tensor(name) for name in st.keys()})
    return state


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    out, cols = weight.shape
    d = out // heads
    return weight.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(out, cols)


def test_missing_names_the_install_line(monkeypatch):
    for module in ("llama_cpp", "gguf"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # import raises ImportError
            reason = missing()
        assert reason is not None and module in reason and "pip install 'moeshard[llamacpp]'" in reason
        assert "\n" not in reason


def test_module_imports_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setitem(sys.modules, "gguf", None)
    spec = importlib.util.spec_from_file_location("llamacpp_without_extra", llamacpp.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "llama_cpp" in module.missing()
    with pytest.raises(ImportError):
        module.quantize(Path("a.gguf"), Path("b.gguf"), "Q8_0", threads=THREADS)


@needs_gguf
@pytest.mark.parametrize("family", list(SPECS))
def test_gguf_holds_the_checkpoint_as_llama_cpp_names_it(family, checkpoints, ggufs):
    import gguf

    ckpt, spec = checkpoints[family], SPECS[family]
    config = json.loads((ckpt / "config.json").read_text())
    reader = gguf.GGUFReader(str(ggufs[family]))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}[family]
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == spec.num_hidden_layers
    assert fields[f"{arch}.expert_count"] == spec.num_local_experts
    assert fields[f"{arch}.expert_used_count"] == spec.num_experts_per_tok
    assert fields[f"{arch}.attention.head_count"] == spec.num_attention_heads
    assert fields[f"{arch}.attention.head_count_kv"] == spec.num_key_value_heads
    assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == head_dim
    assert fields[f"{arch}.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert fields["tokenizer.ggml.model"] == "none" and fields[f"{arch}.vocab_size"] == spec.vocab_size
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    if family == "qwen3_moe":
        assert fields[f"{arch}.expert_feed_forward_length"] == spec.intermediate_size
    else:
        assert fields[f"{arch}.feed_forward_length"] == spec.intermediate_size

    state = state_of(ckpt)
    tensors = {t.name: t for t in reader.tensors}
    moe, names = EXPERT_NAMES[family]
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        expected.update({f"blk.{i}.attn_norm.weight": f"{p}.input_layernorm.weight",
                         f"blk.{i}.ffn_norm.weight": f"{p}.post_attention_layernorm.weight",
                         f"blk.{i}.attn_q.weight": f"{p}.self_attn.q_proj.weight",
                         f"blk.{i}.attn_k.weight": f"{p}.self_attn.k_proj.weight",
                         f"blk.{i}.attn_v.weight": f"{p}.self_attn.v_proj.weight",
                         f"blk.{i}.attn_output.weight": f"{p}.self_attn.o_proj.weight",
                         f"blk.{i}.ffn_gate_inp.weight": f"{p}.{moe}.gate.weight"})
        if family == "qwen3_moe":
            expected.update({f"blk.{i}.attn_q_norm.weight": f"{p}.self_attn.q_norm.weight",
                             f"blk.{i}.attn_k_norm.weight": f"{p}.self_attn.k_norm.weight"})
    assert set(tensors) == set(expected) | {f"blk.{i}.ffn_{w}_exps.weight" for i in range(spec.num_hidden_layers)
                                            for w in ("gate", "up", "down")}
    for name, theirs in expected.items():
        assert tensors[name].data.shape == tuple(state[theirs].shape), name
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    for i in range(spec.num_hidden_layers):
        for ours, theirs in names.items():
            stacked = tensors[f"blk.{i}.ffn_{ours}_exps.weight"]
            one = state[f"model.layers.{i}.{moe}.experts.0.{theirs}.weight"]
            assert stacked.data.shape == (spec.num_local_experts, *one.shape)
            assert list(stacked.shape) == [one.shape[1], one.shape[0], spec.num_local_experts]  # ggml's order

    def data(name: str) -> torch.Tensor:
        return torch.from_numpy(tensors[name].data.copy())

    for ours, theirs in names.items():
        expert = state[f"model.layers.1.{moe}.experts.5.{theirs}.weight"]
        assert torch.equal(data(f"blk.1.ffn_{ours}_exps.weight")[5], expert), ours
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    if family == "mixtral":  # llama arch: q/k rows permuted as convert_hf_to_gguf does
        assert torch.equal(data("blk.0.attn_q.weight"), permute_rope(q, spec.num_attention_heads))
        assert torch.equal(data("blk.0.attn_k.weight"), permute_rope(k, spec.num_key_value_heads))
        assert not torch.equal(data("blk.0.attn_q.weight"), q)
    else:  # qwen3moe: NEOX rope, rows as transformers has them
        assert torch.equal(data("blk.0.attn_q.weight"), q) and torch.equal(data("blk.0.attn_k.weight"), k)
    assert torch.equal(data("blk.1.attn_v.weight"), state["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(data("output.weight"), state["lm_head.weight"])


@needs_gguf
def test_bfloat16_checkpoint_is_written_as_bf16(tmp_path):
    import gguf

    spec = BenchModelSpec.of_kind("qwen3-30b-a3b", hidden_size=64, intermediate_size=32, num_local_experts=4,
                                  num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    assert spec.dtype == "bfloat16"
    ckpt = make_bench_checkpoint(tmp_path / "bf16", spec)
    reader = gguf.GGUFReader(str(write_gguf(ckpt, tmp_path / "bf16.gguf")))
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_BF16
    types = {t.name: t.tensor_type for t in reader.tensors}
    f32 = {n for n in types if n.endswith("norm.weight") or n.endswith("ffn_gate_inp.weight")}
    assert len(f32) == 1 + 5 * spec.num_hidden_layers  # output norm; per layer 2 norms, q/k norms, router
    assert all(types[n] == gguf.GGMLQuantizationType.F32 for n in f32)
    assert all(t == gguf.GGMLQuantizationType.BF16 for n, t in types.items() if n not in f32)
    state = state_of(ckpt)
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    bits = torch.from_numpy(down.data.copy()).view(torch.int16).reshape(4, 64, 32)  # the reader gives raw bytes
    assert torch.equal(bits[2], state["model.layers.0.mlp.experts.2.down_proj.weight"].view(torch.int16))


@needs_gguf
def test_gguf_is_reused_until_the_checkpoint_or_writer_changes(checkpoints, tmp_path, monkeypatch):
    ckpt = checkpoints["mixtral"]
    out = write_gguf(ckpt, tmp_path / "m.gguf")
    first = out.stat().st_mtime_ns
    assert write_gguf(ckpt, out).stat().st_mtime_ns == first  # reused
    monkeypatch.setattr(llamacpp, "WRITER_VERSION", llamacpp.WRITER_VERSION + 1)
    assert write_gguf(ckpt, out).stat().st_mtime_ns != first  # another writer version: rewritten
    second = out.stat().st_mtime_ns
    newer = max(f.stat().st_mtime_ns for f in ckpt.glob("*.safetensors")) + 10**9
    os.utime(out, ns=(newer - 2 * 10**9, newer - 2 * 10**9))  # the file is now older than the checkpoint
    assert write_gguf(ckpt, out).stat().st_mtime_ns not in (second, newer - 2 * 10**9)


@needs_gguf
def test_an_interrupted_write_leaves_no_file(checkpoints, tmp_path, monkeypatch):
    import gguf

    calls = []

    def fail_on_third(self, tensor, *args, **kwargs):
        calls.append(tensor.nbytes)
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(checkpoints["qwen3_moe"], tmp_path / "q.gguf")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


@needs_gguf
def test_checkpoints_llama_cpp_would_decode_differently_are_refused(checkpoints, tmp_path):
    config = json.loads((checkpoints["qwen3_moe"] / "config.json").read_text())
    cases = {"norm_topk_prob": {**config, "norm_topk_prob": False},
             "rope scaling": {**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
             "dense layers": {**config, "mlp_only_layers": [0]},
             "not 'llama'": {**config, "model_type": "llama"}}
    for match, bad in cases.items():
        folder = tmp_path / match.replace(" ", "_").replace("'", "")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            write_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def transformers_greedy(ckpt: Path, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy decode with a KV cache (as the bench's torch loop): tokens and each step's logits."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cache, ids, tokens, logits = DynamicCache(config=model.config), torch.tensor([prompt]), [], []
    with torch.inference_mode():
        for _ in range(steps + 1):
            last = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


def assert_greedy_agrees(got: list[int], want: list[int], want_logits: list[torch.Tensor], atol: float) -> None:
    """The same tokens, unless a genuine near-tie parts them: transformers' own logits at the first difference
    must rank the two tokens within what the implementations may differ by (2 x atol)."""
    if got == want:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    gap = (want_logits[i][want[i]] - want_logits[i][got[i]]).item()
    assert gap < 2 * atol, (f"step {i}: llama.cpp chose {got[i]}, transformers {want[i]}, by a logit gap of "
                            f"{gap:.2e}: not a near-tie\nllama.cpp    {got}\ntransformers {want}")


@needs_llama_cpp
@pytest.mark.parametrize("family", list(SPECS))
def test_llama_cpp_decodes_transformers_greedy_tokens(family, checkpoints, ggufs):
    want, want_logits = transformers_greedy(checkpoints[family], PROMPT, STEPS)
    for f32_attention, atol in ((True, LOGITS_ATOL), (False, DEFAULT_ATOL)):
        with LlamaCppModel(ggufs[family], threads=THREADS, n_ctx=64, f32_attention=f32_attention) as model:
            got = model.decode(PROMPT, STEPS)
            again = model.decode(PROMPT, STEPS)  # the KV cache is reset: an independent, identical round
            first = torch.from_numpy(model.logits(PROMPT))
            assert model.n_vocab == SPECS[family].vocab_size
        assert len(got["tokens"]) == STEPS + 1 and len(got["step_s"]) == STEPS and got["prefill_s"] > 0
        assert all(s > 0 for s in got["step_s"]) and again["tokens"] == got["tokens"]
        diff = (first - want_logits[0]).abs().max().item()
        assert diff < atol, (f"f32_attention={f32_attention}: first-step logits differ by {diff:.2e} "
                             f"(their std {want_logits[0].std():.3f})")
        assert_greedy_agrees(got["tokens"], want, want_logits, atol)


@needs_llama_cpp
def test_decode_refuses_what_llama_cpp_cannot_hold(ggufs):
    with LlamaCppModel(ggufs["qwen3_moe"], threads=THREADS, n_ctx=16) as model:
        with pytest.raises(ValueError, match="exceed n_ctx"):
            model.decode(PROMPT, 9)
        with pytest.raises(ValueError, match="token ids"):
            model.decode([4096], 1)
        assert len(model.decode(PROMPT, 8)["tokens"]) == 9  # exactly n_ctx fits
    model.close()  # closing twice is harmless
    with pytest.raises(FileNotFoundError):
        LlamaCppModel(ggufs["qwen3_moe"].with_name("absent.gguf"), threads=THREADS)


@needs_llama_cpp
@pytest.mark.parametrize("family", list(SPECS))
def test_q8_0_from_llama_cpp_quantizer_decodes(family, ggufs, tmp_path):
    source, target = ggufs[family], tmp_path / f"{family}-q8_0.gguf"
    took = quantize(source, target, "Q8_0", threads=THREADS)
    assert took is not None and took > 0 and target.stat().st_size < source.stat().st_size / 2
    assert quantize(source, target, "Q8_0", threads=THREADS) is None  # newer than its source: reused
    with pytest.raises(ValueError, match="Q8_0"):
        quantize(source, tmp_path / "x.gguf", "Q5_9", threads=THREADS)
    with LlamaCppModel(source, threads=THREADS, n_ctx=64) as f32:
        want, want_logits = f32.decode(PROMPT, STEPS)["tokens"], f32.logits(PROMPT)
    with LlamaCppModel(target, threads=THREADS, n_ctx=64) as q8:
        got, got_logits = q8.decode(PROMPT, STEPS)["tokens"], q8.logits(PROMPT)
    assert len(got) == STEPS + 1 and all(0 <= t < SPECS[family].vocab_size for t in got)
    rel = abs(got_logits - want_logits).max() / want_logits.std()
    assert 0 < rel < Q8_0_REL, f"Q8_0 logits {rel:.3f} of F32's std away; tokens Q8_0 {got}, F32 {want}"

