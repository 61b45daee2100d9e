"""The bench's llama.cpp system: the benchmark checkpoint written as GGUF and decoded by llama.cpp.

`write_gguf` converts a Qwen3-MoE benchmark checkpoint (the `many-experts` and `qwen3-30b-a3b` kinds) with
gguf's writer, tensor names and metadata as llama.cpp's own converter writes them for `qwen3moe`; `quantize`
calls llama.cpp's quantizer (Q8_0, Q4_0, ...); `LlamaCppModel.decode` times greedy decoding as the torch
systems are timed. Both libraries are an optional extra (`pip install 'moeshard[llamacpp]'`); nothing here is
used outside the bench.
"""
from __future__ import annotations

import ctypes
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL = "pip install 'moeshard[llamacpp]' (llama-cpp-python compiles llama.cpp: a few minutes)"
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}


def missing() -> str | None:
    """Why the llama.cpp system cannot run here (None when it can)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: {INSTALL}"
    return None


def _numpy(tensor):
    """A torch tensor as a numpy array gguf writes: float32 as is, bfloat16 as its 16-bit patterns."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.uint16).numpy()
    return tensor.float().contiguous().numpy()


def write_gguf(ckpt: Path, out: Path) -> Path:
    """The checkpoint as one GGUF file in its own dtype (norms and the router in float32); reused when `out` is
    newer than the checkpoint. Only Qwen3-MoE (llama.cpp's `qwen3moe`) is written."""
    import gguf
    import torch
    from safetensors import safe_open

    ckpt, out = Path(ckpt), Path(out)
    files = sorted(ckpt.glob("*.safetensors"))
    if out.is_file() and out.stat().st_mtime > max(f.stat().st_mtime for f in files):
        return out
    config = json.loads((ckpt / "config.json").read_text())
    if config.get("model_type") != "qwen3_moe":
        raise ValueError(f"the llama.cpp system writes Qwen3-MoE checkpoints, not {config.get('model_type')!r}: "
                         "use --model-kind many-experts or qwen3-30b-a3b")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
    layers = config["num_hidden_layers"]
    experts = config.get("num_experts") or config["num_local_experts"]  # transformers 5 saves the latter
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bf16 = tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    raw = gguf.GGMLQuantizationType.BF16 if bf16 else None

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "qwen3moe")
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta")
                                    or 1e6))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    # No tokenizer: the bench feeds token ids. A vocabulary of placeholder pieces lets llama.cpp load the model
    # with its output width; none of them is ever tokenized.
    vocab = config["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_bos_token_id(config.get("bos_token_id", 1))
    writer.add_eos_token_id(config.get("eos_token_id", 2))

    def add(name: str, tensor, keep_float32: bool = False) -> None:
        if keep_float32 or raw is None:
            writer.add_tensor(name, tensor.float().contiguous().numpy())
        else:
            writer.add_tensor(name, _numpy(tensor), raw_dtype=raw)

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    add("output_norm.weight", tensors["model.norm.weight"], keep_float32=True)
    add("output.weight", tensors["lm_head.weight"])
    for i in range(layers):
        p = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", tensors[f"{p}.input_layernorm.weight"], keep_float32=True)
        add(f"blk.{i}.ffn_norm.weight", tensors[f"{p}.post_attention_layernorm.weight"], keep_float32=True)
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            add(f"blk.{i}.{ours}.weight", tensors[f"{p}.self_attn.{theirs}.weight"])
        add(f"blk.{i}.attn_q_norm.weight", tensors[f"{p}.self_attn.q_norm.weight"], keep_float32=True)
        add(f"blk.{i}.attn_k_norm.weight", tensors[f"{p}.self_attn.k_norm.weight"], keep_float32=True)
        add(f"blk.{i}.ffn_gate_inp.weight", tensors[f"{p}.mlp.gate.weight"], keep_float32=True)
        for ours, theirs in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
            add(f"blk.{i}.{ours}.weight",  # [E, out, in]
                torch.stack([tensors[f"{p}.mlp.experts.{e}.{theirs}.weight"] for e in range(experts)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def quantize(src: Path, dst: Path, type_name: str, threads: int) -> float | None:
    """llama.cpp's quantizer, `src` -> `dst` as `type_name` (a key of FTYPES): seconds taken, or None when `dst`
    is already newer than `src`."""
    import llama_cpp

    if type_name not in FTYPES:
        raise ValueError(f"llama.cpp type must be one of {list(FTYPES)}, got {type_name!r}")
    src, dst = Path(src), Path(dst)
    if dst.is_file() and dst.stat().st_mtime > src.stat().st_mtime:
        return None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[type_name])
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {type_name}")
    took = time.perf_counter() - start
    tmp.replace(dst)
    return took


class LlamaCppModel:
    """A GGUF model in llama.cpp on the CPU, decoded greedily one token per call of llama_decode."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 512):
        import llama_cpp

        # mmap is llama.cpp's default and what its users run; the bench's warm protocol allows the page cache.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self._logits_ith = llama_cpp.llama_get_logits_ith

    def _argmax_last(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def decode(self, prompt: list[int], steps: int) -> dict:
        """Prefill `prompt`, then `steps` greedy steps, each timed on its own (as the bench's torch decode)."""
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        token = self._argmax_last()
        prefill_s = time.perf_counter() - start
        tokens, times = [token], []
        for _ in range(steps):
            start = time.perf_counter()
            self.llm.eval([token])
            token = self._argmax_last()
            times.append(time.perf_counter() - start)
            tokens.append(token)
        return {"prefill_s": prefill_s, "step_s": times, "tokens": tokens}

    def close(self) -> None:
        self.llm.close()
