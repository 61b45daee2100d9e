"""The bench's "llama.cpp" system: the same benchmark weights run by llama.cpp, for a side-by-side comparison.

`write_gguf` writes a benchmark checkpoint (Qwen3-MoE or Mixtral) as GGUF in its own dtype, `quantize` runs
llama.cpp's own quantizer, and `LlamaCppModel.decode` times greedy decoding as the bench's torch loop does.
It is not a general converter: no tokenizer (the bench feeds token ids), no rope scaling, no shared experts.
Both libraries are an optional extra (`pip install 'moeshard[llamacpp]'`), imported only when used.
"""
from __future__ import annotations

import ctypes
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

INSTALL = "pip install 'moeshard[llamacpp]'"
# llama.cpp file types that `quantize` produces, by the name the bench's systems use (llama.cpp@Q4_0 ...)
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}
# Stamped into every GGUF written here; a file with another version is rewritten rather than reused.
WRITER_VERSION = 2
_VERSION_KEY = "moeshard.gguf_writer_version"
_ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}  # transformers model_type -> llama.cpp architecture


def missing() -> str | None:
    """Why the llama.cpp system cannot run here, in one line with the install command (None when it can)."""
    absent = []
    for module in ("llama_cpp", "gguf"):
        try:
            __import__(module)
        except ImportError:  # an OSError (llama.cpp's library failing to load) is a real error: raised
            absent.append(module)
    if not absent:
        return None
    return (f"the llama.cpp system needs {' and '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not "
            f"installed: {INSTALL}")


# ---------------------------------------------------------------------------------------------------------------
# Writing the checkpoint as GGUF


def _permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's `LlamaModel.permute`: Hugging Face's q/k rows (rotate-half rope) reordered for
    llama.cpp's `llama` architecture, whose rope rotates adjacent pairs (qwen3moe uses NEOX rope: no permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _plan(config: dict) -> list[tuple[str, list[str], str]]:
    """(GGUF name, checkpoint names, how) in llama.cpp's order; how: "norm" (float32), "router" (float32, as
    convert_hf_to_gguf keeps FFN_GATE_INP), "q"/"k" (permuted for the llama arch), "experts" (stacked), "plain"."""
    family = config["model_type"]
    layers, experts = config["num_hidden_layers"], _experts(config)
    plan = [("token_embd.weight", ["model.embed_tokens.weight"], "plain"),
            ("output_norm.weight", ["model.norm.weight"], "norm"),
            ("output.weight", ["lm_head.weight"], "plain")]
    for i in range(layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        plan += [(f"{b}.attn_norm.weight", [f"{p}.input_layernorm.weight"], "norm"),
                 (f"{b}.attn_q.weight", [f"{p}.self_attn.q_proj.weight"], "q"),
                 (f"{b}.attn_k.weight", [f"{p}.self_attn.k_proj.weight"], "k"),
                 (f"{b}.attn_v.weight", [f"{p}.self_attn.v_proj.weight"], "plain"),
                 (f"{b}.attn_output.weight", [f"{p}.self_attn.o_proj.weight"], "plain")]
        if family == "qwen3_moe":
            plan += [(f"{b}.attn_q_norm.weight", [f"{p}.self_attn.q_norm.weight"], "norm"),
                     (f"{b}.attn_k_norm.weight", [f"{p}.self_attn.k_norm.weight"], "norm")]
            moe, names = f"{p}.mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        else:
            moe, names = f"{p}.block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
        plan += [(f"{b}.ffn_norm.weight", [f"{p}.post_attention_layernorm.weight"], "norm"),
                 (f"{b}.ffn_gate_inp.weight", [f"{moe}.gate.weight"], "router")]
        for ours in ("gate", "up", "down"):  # [E, out, in]: llama.cpp's {in, out, E}
            plan.append((f"{b}.ffn_{ours}_exps.weight",
                         [f"{moe}.experts.{e}.{names[ours]}.weight" for e in range(experts)], "experts"))
    return plan


def _experts(config: dict) -> int:
    return config.get("num_local_experts") or config["num_experts"]  # transformers 5 saves the former


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _check_supported(config: dict) -> None:
    family = config.get("model_type")
    if family not in _ARCH:
        raise ValueError(f"the llama.cpp system writes {' and '.join(_ARCH)} checkpoints, not {family!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not written to GGUF here")
    if family == "qwen3_moe":
        if not config.get("norm_topk_prob", False):
            # llama.cpp's qwen3moe graph always renormalises the top-k weights (build_moe_ffn's norm_w = true)
            raise ValueError("llama.cpp's qwen3moe normalises the top-k routing weights: norm_topk_prob=False "
                             "checkpoints would decode differently")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ValueError("Qwen3-MoE checkpoints with dense layers (mlp_only_layers, decoder_sparse_step) are "
                             "not written here")
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        logger.warning("the checkpoint has a sliding window of %d; llama.cpp's %s attends to the whole context",
                       config["sliding_window"], _ARCH[family])


def _add_metadata(writer, config: dict, name: str, file_type: int) -> None:
    import gguf

    family = config["model_type"]
    head_dim = _head_dim(config)
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_uint32(_VERSION_KEY, WRITER_VERSION)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    # mixtral (llama arch): the experts' width; qwen3moe: the dense width llama.cpp ignores when the next is set
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(_experts(config))
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if family == "qwen3_moe":
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        writer.add_expert_weights_norm(True)  # documents what llama.cpp's qwen3moe graph does regardless
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # No tokenizer: the bench feeds token ids. llama.cpp's vocab loader (llama-vocab.cpp) takes
    # tokenizer.ggml.model "none" as LLAMA_VOCAB_TYPE_NONE and adds `{arch}.vocab_size` dummy tokens, so the
    # model loads with its real output width and llama_decode accepts ids below it; convert_hf_to_gguf writes
    # the same for models without a text vocabulary (`_set_vocab_none`). No BOS/EOS ids: none are added.
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(config["vocab_size"])


def _is_current(out: Path, sources: list[Path]) -> bool:
    if not out.is_file() or out.stat().st_mtime <= max(f.stat().st_mtime for f in sources):
        return False
    import gguf

    try:
        field = gguf.GGUFReader(str(out)).get_field(_VERSION_KEY)
        return field is not None and int(field.contents()) == WRITER_VERSION
    except (ValueError, OSError):  # a truncated or foreign file: written again
        return False


def write_gguf(ckpt: Path, out: Path) -> Path:
    """Write the benchmark checkpoint `ckpt` as the GGUF file `out`, tensor names and metadata as llama.cpp's
    convert_hf_to_gguf writes them (qwen3_moe -> `qwen3moe`, mixtral -> `llama` with experts), in the
    checkpoint's dtype (bfloat16 -> BF16, float32 -> F32, float16 -> F16; norms and routers F32). Per-expert
    tensors are stacked into `ffn_{gate,up,down}_exps`. Tensors are read and written one at a time (the largest
    in memory is one stacked expert tensor). An `out` newer than the checkpoint, from this writer's version,
    is reused. Returns `out`."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    ckpt, out = Path(ckpt), Path(out)
    config = json.loads((ckpt / "config.json").read_text())
    _check_supported(config)
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {ckpt}")
    if _is_current(out, files + [ckpt / "config.json"]):
        logger.info("reusing %s", out)
        return out

    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    plan = _plan(config)
    absent = [n for _, names, _ in plan for n in names if n not in where]
    if absent:
        raise ValueError(f"{ckpt} lacks {len(absent)} tensors llama.cpp needs, e.g. {absent[:3]}")
    dtypes = {where[n].get_slice(n).get_dtype() for _, names, how in plan if how != "norm" for n in names}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ("F32", "BF16", "F16"):
        raise ValueError(f"expected one dtype of F32, BF16 or F16 in {ckpt}, found {sorted(dtypes)}")
    stored = next(iter(dtypes))
    # numpy holds bfloat16 as its bit patterns (uint16), written with GGML's BF16 type
    np_dtype, raw = {"F32": (np.float32, None), "F16": (np.float16, None),
                     "BF16": (np.uint16, gguf.GGMLQuantizationType.BF16)}[stored]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "BF16": gguf.LlamaFileType.MOSTLY_BF16}[stored]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    permute = config["model_type"] == "mixtral"

    def numpy_of(tensor: torch.Tensor, f32: bool) -> np.ndarray:
        tensor = tensor.contiguous()
        if f32:
            return tensor.float().numpy()
        if stored == "BF16":
            return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return tensor.to(torch.float32 if stored == "F32" else torch.float16).numpy()

    def shape_of(names: list[str], how: str) -> list[int]:
        shape = list(where[names[0]].get_slice(names[0]).get_shape())
        return [len(names), *shape] if how == "experts" else shape

    def produce(names: list[str], how: str) -> np.ndarray:
        f32 = how in ("norm", "router")
        if how == "experts":  # filled expert by expert: one stacked tensor in memory, not E copies
            stacked = np.empty(shape_of(names, how), dtype=np_dtype)
            for e, name in enumerate(names):
                stacked[e] = numpy_of(where[name].get_tensor(name), False)
            return stacked
        tensor = where[names[0]].get_tensor(names[0])
        if permute and how in ("q", "k"):
            tensor = _permute_rope(tensor, n_head if how == "q" else n_kv)
        return numpy_of(tensor, f32)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), _ARCH[config["model_type"]])
    done = False
    try:
        _add_metadata(writer, config, ckpt.name, file_type)
        for gguf_name, names, how in plan:
            shape = shape_of(names, how)
            f32 = how in ("norm", "router")
            itemsize = 4 if f32 else np.dtype(np_dtype).itemsize
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if f32 else np_dtype),
                                   int(np.prod(shape)) * itemsize, raw_dtype=None if f32 else raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (gguf_name, names, how) in enumerate(plan):
            writer.write_tensor_data(produce(names, how))
            if how == "experts" and gguf_name.endswith("down_exps.weight"):
                logger.info("GGUF: wrote %s (%d of %d tensors)", gguf_name.split(".ffn")[0], i + 1, len(plan))
        done = True
    finally:
        writer.close()
        if not done:  # never a truncated file under either name
            tmp.unlink(missing_ok=True)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself


# ggml's log levels (ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 continues the previous line) -> ours, one
# notch down for warnings: on these tokenizer-less models llama.cpp warns as designed ("adding 4096 dummy tokens").
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_native_logger = logger.getChild("native")
_log_state = {"level": logging.DEBUG, "callback": None}


def _route_logs(llama_cpp) -> None:
    """Send llama.cpp's log lines to `moeshard.benchmarks.llamacpp.native` instead of stderr.

    llama-cpp-python 0.3.36 installs a callback that prints to stderr by an older numbering of ggml's levels
    (its warnings come out as errors, and everything while its logger's level is unset); `Llama(verbose=False)`
    hides that by redirecting the process's stderr while loading. This replaces the callback for the process,
    once: the bench uses no other llama-cpp-python object."""
    if _log_state["callback"] is not None:
        return

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data) -> None:
        if level != 5:
            _log_state["level"] = _LOG_LEVELS.get(level, logging.DEBUG)
        line = text.decode("utf-8", "replace").rstrip()
        if line and _native_logger.isEnabledFor(_log_state["level"]):
            _native_logger.log(_log_state["level"], "%s", line)

    _log_state["callback"] = forward  # kept referenced: llama.cpp holds the pointer
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


_backend_ready = False


def _backend():
    import llama_cpp

    global _backend_ready
    if not _backend_ready:
        _route_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def quantize(src: Path, dst: Path, type_name: str, threads: int) -> float | None:
    """llama.cpp's own quantizer (`llama_model_quantize`, as its llama-quantize tool): `src` -> `dst` as
    `type_name` (a key of FTYPES; llama.cpp's mixes, e.g. Q4_0 keeps the output layer at Q6_K). Returns the
    seconds it took, or None when `dst` is already newer than `src` and was reused."""
    if type_name not in FTYPES:
        raise ValueError(f"llama.cpp type must be one of {list(FTYPES)}, got {type_name!r}")
    llama_cpp = _backend()
    src, dst = Path(src), Path(dst)
    if dst.is_file() and dst.stat().st_mtime > src.stat().st_mtime:
        return None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[type_name])
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    start = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    took = time.perf_counter() - start
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {type_name} (status {status})")
    tmp.replace(dst)
    logger.info("llama.cpp quantized %s to %s in %.1f s", src.name, type_name, took)
    return took


class LlamaCppModel:
    """A GGUF model in llama.cpp on the CPU, decoded greedily through llama-cpp-python's low-level API.

    A step is one `llama_decode` of a one-token batch built once (`llama_batch_get_one`: positions follow the KV
    cache) and an argmax over the logits llama.cpp returns. The high-level `Llama.eval` builds a new batch in
    Python and trims the KV cache on every call. Measured on an idle machine (2 cores), best of rounds of 64
    steps: a tiny Qwen3-MoE, 1 thread, 236 us a step here against 270 us through `Llama.eval` (the Python
    around llama_decode alone: 5.2 against 10.5 us); the qwen3-30b-a3b bench shape at Q4_0, 2 threads,
    3.46 against 3.64 ms."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 512, *, f32_attention: bool = False):
        """Load `path` for `threads` CPU threads (decode and prefill alike) and `n_ctx` tokens. llama.cpp's
        defaults keep the KV cache in F16 and use flash attention where it can, which is what the bench runs
        and compares; `f32_attention` keeps both in float32 instead (tests compare logits with transformers)."""
        llama_cpp = _backend()
        self._lib = llama_cpp
        self.path, self.threads, self.n_ctx = Path(path), threads, n_ctx
        self._model = self._ctx = None
        if not self.path.is_file():
            raise FileNotFoundError(self.path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        # mmap (llama.cpp's default, what its users run), set explicitly rather than left to LOAD_MODE_AUTO,
        # and no lazy reads: every weight is mapped at load. Mapped weights are the GGUF's page-cache pages, so
        # after the first round they stay in RAM while the bench interleaves other systems (the page cache is
        # shared, not a private copy); the bench's cold protocol does not evict this file. Weights llama.cpp
        # repacks for its CPU kernels (e.g. Q4_0/Q8_0 on AVX2) are copied into its own buffers either way.
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        params.lazy_mode = llama_cpp.LLAMA_LAZY_MODE_OFF
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        cparams = llama_cpp.llama_context_default_params()
        # one batch (and one ubatch) holds a whole prompt: prefill is a single llama_decode
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if f32_attention:
            cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} for {self.path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        # One token's batch, built once: positions (batch.pos NULL) continue from the KV cache, logits for it.
        self._one = (llama_cpp.llama_token * 1)()
        self._one_batch = llama_cpp.llama_batch_get_one(self._one, 1)

    def _decode(self, batch) -> None:
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _last_logits(self) -> np.ndarray:
        import numpy as np

        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def _reset(self, tokens: list[int]) -> None:
        """Check `tokens` and empty the KV cache: each call starts from position 0, independent of the last."""
        if not tokens:
            raise ValueError("the prompt is empty")
        if max(tokens) >= self.n_vocab or min(tokens) < 0:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        self._lib.llama_memory_clear(self._memory, True)

    def _prefill(self, tokens: list[int]) -> None:
        """One llama_decode of the whole prompt (one batch; logits of its last token only)."""
        ids = (self._lib.llama_token * len(tokens))(*tokens)
        self._decode(self._lib.llama_batch_get_one(ids, len(tokens)))

    def decode(self, prompt: list[int], steps: int) -> dict:
        """Prefill `prompt` as one batch, then `steps` greedy decode steps, as the bench's torch `decode`:
        {"prefill_s", "step_s": one time per step (llama_decode and reading the logits), "tokens": steps + 1}."""
        if len(prompt) + steps > self.n_ctx:
            raise ValueError(f"{len(prompt)} prompt tokens and {steps} steps exceed n_ctx={self.n_ctx}")
        decode, ctx, one, batch = self._lib.llama_decode, self._ctx, self._one, self._one_batch
        logits_ith, n_vocab = self._lib.llama_get_logits_ith, self.n_vocab
        import numpy as np

        as_array = np.ctypeslib.as_array
        prompt = [int(t) for t in prompt]
        self._reset(prompt)  # outside the timer, as the torch loop makes its empty cache before timing
        start = time.perf_counter()
        self._prefill(prompt)
        token = int(self._last_logits().argmax())
        prefill_s = time.perf_counter() - start
        tokens, times = [token], []
        for _ in range(steps):
            one[0] = token
            start = time.perf_counter()
            status = decode(ctx, batch)
            token = int(as_array(logits_ith(ctx, -1), shape=(n_vocab,)).argmax())
            times.append(time.perf_counter() - start)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            tokens.append(token)
        return {"prefill_s": prefill_s, "step_s": times, "tokens": tokens}

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The next-token logits after `tokens` (from an empty KV cache), as float32: a copy."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens exceed n_ctx={self.n_ctx}")
        tokens = [int(t) for t in tokens]
        self._reset(tokens)
        self._prefill(tokens)
        return self._last_logits().copy()

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

