"""HQQ quantization and the quantized cache: error per bit width, self-contained packed experts, attention
modules, 8-bit greedy parity, and cache reuse, corruption and keying."""
import copy
import hashlib
import json
import logging
import shutil

import pytest
import torch
from hqq.core.quantize import HQQLinear, hqq_base_quant_config
from safetensors import safe_open
from torch import nn
from transformers import MixtralForCausalLM

from moeshard.offload_core.checkpoint import Checkpoint
from moeshard.offload_core.config import DEFAULT_EXPERT_GROUP, QuantConfig
from moeshard.offload_core.experts import ExpertKey, ExpertMath, ExpertTensor
from moeshard.offload_core.families import open_layout
from moeshard.offload_core.formats import DenseFormat, expert_format
from moeshard.offload_core.local_experts import LocalExperts, expert_fingerprint
from moeshard.offload_core.kernels import cpu_kernels
from moeshard.offload_core.quant import HQQExpertFormat, PackedLinear, quantize_attention
from moeshard.offload_core.quantized_cache import (QuantizedCache, QuantizedCacheSource, default_cache_root,
                                                   open_quantized_cache)
from moeshard.offload_core.stores import CheckpointSource

from .conftest import NUM_EXPERTS, make_checkpoint

# Relative error |y_q - y| / |y| of N(0, 0.05) weights at the paper's groups (8/4/3-bit g64, 2-bit g16),
# measured over 3 seeds: 0.0050-0.0051, 0.085-0.087, 0.176-0.185, 0.299-0.308. Bounds leave ~20% margin.
ERROR_BOUND = {8: 0.008, 4: 0.11, 3: 0.22, 2: 0.35}
SHAPES = {"gate_up": (96, 32), "down": (32, 48)}  # the tiny Mixtral's expert (I = 48, D = 32)


def tensors(shapes: dict[str, tuple[int, ...]] = SHAPES, transposed: bool = False) -> tuple[ExpertTensor, ...]:
    return tuple(ExpertTensor(name, name, shape, transposed and len(shape) == 2) for name, shape in shapes.items())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # hqq's optimiser runs ~20 elementwise passes on tensors this small: waking a thread pool costs more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _random_expert(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g) * 0.05 for name, shape in SHAPES.items()}


def test_quantized_linear_error_grows_as_bits_shrink():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(128, 64, generator=g) * 0.05, torch.randn(32, 64, generator=g)
    errors = {}
    for bits in (8, 4, 3, 2):
        linear = nn.Linear(64, 128, bias=False)
        linear.weight.data = weight.clone()
        kernels = cpu_kernels()
        qlinear = PackedLinear(linear, bits, DEFAULT_EXPERT_GROUP[bits], kernels, kernels)
        errors[bits] = _rel(qlinear(x), x @ weight.t())
        assert errors[bits] < ERROR_BOUND[bits], errors
    assert errors[8] < errors[4] < errors[3] < errors[2], errors


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_expert_format_round_trip_is_self_contained(bits):
    weights = _random_expert()
    fmt = HQQExpertFormat(tensors(), bits, DEFAULT_EXPERT_GROUP[bits], torch.float32)
    buf = fmt.encode(weights, fmt.layout.empty())
    fresh = torch.empty(fmt.layout.nbytes, dtype=torch.uint8)
    fresh.copy_(buf)  # one copy of nbytes moves the whole expert
    del buf
    decoded = fmt.decode(fresh)
    for name, w in weights.items():
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == w.shape
        assert _rel(decoded[name], w) < ERROR_BOUND[bits], (name, _rel(decoded[name], w))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_expert_format_with_hqqs_quantizer_keeps_what_hqq_linear_keeps(bits):
    # Where the C quantizer is unavailable, hqq's own chooses the codes: our packing must lose nothing of them.
    group = DEFAULT_EXPERT_GROUP[bits]
    weights = _random_expert(1)
    fmt = HQQExpertFormat(tensors(), bits, group, torch.float16, quantizer="hqq")
    assert fmt.quantizer == "hqq"
    decoded = fmt.decode(fmt.encode(weights, fmt.layout.empty()))
    config = hqq_base_quant_config(nbits=bits, group_size=group, axis=1)
    for name, w in weights.items():
        qlinear = HQQLinear.from_weights(w.clone(), None, config, compute_dtype=torch.float32, device="cpu")
        # hqq keeps scale and zero in float32, we in float16: equal up to float16's rounding of them
        torch.testing.assert_close(decoded[name], qlinear.dequantize(), rtol=2e-3, atol=2e-3 * w.abs().max().item())


def test_expert_format_bf16_and_bits_per_param():
    weights = _random_expert(2)
    fmt = HQQExpertFormat(tensors(), 8, 64, torch.bfloat16)
    buf = fmt.encode(weights, fmt.layout.empty())
    decoded = fmt.decode(buf)
    assert decoded["gate_up"].dtype == torch.float32  # the reference dequantizes in float32 whatever it computes in
    assert _rel(decoded["gate_up"], weights["gate_up"]) < ERROR_BOUND[8]
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert fmt.forward(_mixtral_math(), buf, x).dtype == torch.bfloat16
    # Mixtral-8x7B's expert, codes at their own width, float16 scales and zeros: 8.5, 4.5, 3.5, 4.0.
    mixtral = {"gate_up": (28672, 4096), "down": (4096, 14336)}
    expected = {8: 8.5, 4: 4.5, 3: 3.5, 2: 4.0}
    for bits, bpp in expected.items():
        assert HQQExpertFormat(tensors(mixtral), bits, DEFAULT_EXPERT_GROUP[bits], torch.bfloat16).bits_per_param == \
            pytest.approx(bpp, abs=0.01)
    # Tiny tensors pay for 64-byte alignment and 8 padding scales and zeros per tensor: 4.44 bits/param at 2-bit g16.
    assert HQQExpertFormat(tensors(), 2, 16, torch.float32).bits_per_param == pytest.approx(4.44, abs=0.01)


def _mixtral_math() -> ExpertMath:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return ExpertMath(MixtralExperts(MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=2)))


def test_bad_settings_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"\[16, 8, 4, 3, 2\]"):
        QuantConfig(expert_bits=5)
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantConfig(attn_group=30)
    with pytest.raises(ValueError, match="not a multiple of group"):
        HQQExpertFormat(tensors({"w": (10, 10)}), 4, 64, torch.float32)
    assert QuantConfig(expert_bits=2).expert_group_size == 16
    assert QuantConfig(expert_bits=3).describe() == {"attn_bits": 16, "attn_group": None, "expert_bits": 3,
                                                     "expert_group": 64}
    assert isinstance(expert_format(tensors(), QuantConfig(), torch.float32), DenseFormat)


def _fake_quantize_experts(model: MixtralForCausalLM, bits: int) -> None:
    """Put each expert through HQQExpertFormat's encode/decode, in place in transformers' fused params."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        fmt = HQQExpertFormat(tensors(), bits, DEFAULT_EXPERT_GROUP[bits], torch.float32)
        buf = fmt.layout.empty()
        for e in range(experts.gate_up_proj.shape[0]):
            decoded = fmt.decode(fmt.encode({"gate_up": experts.gate_up_proj[e], "down": experts.down_proj[e]}, buf))
            experts.gate_up_proj.data[e], experts.down_proj.data[e] = decoded["gate_up"], decoded["down"]


def test_quantize_attention_replaces_only_attention(tiny_ckpt, reference):
    ref = reference(tiny_ckpt)
    model = copy.deepcopy(ref)
    assert quantize_attention(model, QuantConfig(), "cpu") == 0
    assert quantize_attention(model, QuantConfig(attn_bits=8), "cpu") == 3 * 4  # q/k/v/o in 3 layers
    for layer, ref_layer in zip(model.model.layers, ref.model.layers):
        assert all(isinstance(getattr(layer.self_attn, p), PackedLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert isinstance(layer.mlp.gate.weight, nn.Parameter)
        assert torch.equal(layer.mlp.gate.weight, ref_layer.mlp.gate.weight)
        assert torch.equal(layer.input_layernorm.weight, ref_layer.input_layernorm.weight)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    ids = torch.tensor([[1, 5, 17, 33, 9, 60, 4, 71]])
    with torch.no_grad():
        # Measured 0.0051 (8-bit attention, float16 scales and zeros).
        assert _rel(model(ids).logits, ref(ids).logits) < 0.01


def test_int8_attention_and_experts_keep_greedy_tokens(tiny_ckpt, reference):
    ref = reference(tiny_ckpt)
    model = copy.deepcopy(ref)
    quantize_attention(model, QuantConfig(attn_bits=8, expert_bits=8), "cpu")
    _fake_quantize_experts(model, 8)
    ids = torch.tensor([[1, 5, 17, 33, 9, 60]])
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with torch.no_grad():
        # Measured: identical for all 32 tokens tried; logits within 0.0048 relative.
        assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))


# -- the quantized cache -----------------------------------------------------------------------

def _open(path, root, bits: int = 3, **kwargs) -> QuantizedCache:
    ckpt = Checkpoint(path)
    _, layout = open_layout(ckpt)
    fmt = expert_format(layout.tensors, QuantConfig(expert_bits=bits), torch.float32)
    return open_quantized_cache(ckpt, layout, fmt, expert_fingerprint(ckpt, layout, fmt), root=root, **kwargs)


def _all_bytes(cache: QuantizedCache) -> dict[ExpertKey, torch.Tensor]:
    source = QuantizedCacheSource(cache)
    out = {}
    for layer in cache.layers:
        for e in range(cache.num_experts):
            out[ExpertKey(layer, e)] = torch.empty(cache.nbytes, dtype=torch.uint8)
            source.read_into(ExpertKey(layer, e), out[ExpertKey(layer, e)])
    source.close()
    return out


def test_cache_builds_once_then_reuses(tiny_ckpt, tmp_path, caplog):
    before = QuantizedCache.experts_quantized
    cache = _open(tiny_ckpt, tmp_path)
    assert cache.built_layers == [0, 1, 2] and QuantizedCache.experts_quantized - before == 3 * NUM_EXPERTS
    with caplog.at_level(logging.INFO, logger="moeshard.offload_core.quantized_cache"):
        again = _open(tiny_ckpt, tmp_path)
    assert again.reused and QuantizedCache.experts_quantized - before == 3 * NUM_EXPERTS
    assert "reusing quantized cache" in caplog.text

    # Bytes read by offset equal what the format encodes straight from the checkpoint.
    direct = CheckpointSource(Checkpoint(tiny_ckpt), cache.source.layout, cache.format)
    source = QuantizedCacheSource(again, drop_page_cache=True)
    for key in (ExpertKey(0, 0), ExpertKey(2, NUM_EXPERTS - 1)):
        expected, got = torch.zeros(cache.nbytes, dtype=torch.uint8), torch.empty(cache.nbytes, dtype=torch.uint8)
        direct.read_into(key, expected)
        source.read_into(key, got)
        assert torch.equal(got, expected)
    assert source.bytes_read == 2 * cache.nbytes
    strided = torch.zeros(2 * cache.nbytes, dtype=torch.uint8)[::2]  # not preadv-able: goes through a staging copy
    source.read_into(ExpertKey(2, NUM_EXPERTS - 1), strided)
    assert torch.equal(strided, expected)
    with pytest.raises(ValueError, match="not in the quantized cache"):
        source.read_into(ExpertKey(3, 0), got)
    source.close()

    # The files are ordinary safetensors, with each expert's SHA-256 in the metadata.
    with safe_open(str(cache.layer_path(1)), framework="pt") as f:
        stored = f.get_tensor("1.5")
        assert torch.equal(stored, _all_bytes(cache)[ExpertKey(1, 5)])
        assert f.metadata()["sha256.1.5"] == hashlib.sha256(stored.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_cache_file_is_rebuilt_not_used(tiny_ckpt, tmp_path, caplog, damage):
    cache = _open(tiny_ckpt, tmp_path)
    good = _all_bytes(cache)
    path = cache.layer_path(1)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[-cache.nbytes // 2] ^= 0xFF
    else:
        data[8:12] = b"\x00[[["
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="moeshard.offload_core.quantized_cache"):
        rebuilt = _open(tiny_ckpt, tmp_path)
    assert rebuilt.built_layers == [1]
    assert "layer 1 is unusable" in caplog.text
    after = _all_bytes(rebuilt)
    assert all(torch.equal(after[key], good[key]) for key in good)


def test_a_layer_file_of_other_settings_is_rebuilt(tiny_ckpt, tmp_path, caplog):
    three, two = _open(tiny_ckpt, tmp_path, bits=3), _open(tiny_ckpt, tmp_path, bits=2)
    shutil.copy(two.layer_path(0), three.layer_path(0))  # a 2-bit layer where a 3-bit one belongs
    with caplog.at_level(logging.WARNING, logger="moeshard.offload_core.quantized_cache"):
        assert _open(tiny_ckpt, tmp_path, bits=3).built_layers == [0]
    assert "layer 0 is unusable" in caplog.text and "metadata" in caplog.text


def test_cache_key_follows_settings_and_content(tiny_ckpt, tmp_path, monkeypatch):
    three, two = _open(tiny_ckpt, tmp_path, bits=3), _open(tiny_ckpt, tmp_path, bits=2)
    assert three.folder != two.folder and not two.reused
    # Same config and tensor names, other weights (another seed): a different cache, not a stale hit.
    other = _open(make_checkpoint(tmp_path / "other", seed=7), tmp_path, bits=3)
    assert other.folder != three.folder and not other.reused
    monkeypatch.setenv("MOESHARD_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_root() == tmp_path / "env"
    assert _open(tiny_ckpt, None, bits=3).folder.parent == tmp_path / "env"


@pytest.mark.parametrize("store", ["ram", "disk"])
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_local_experts_run_from_the_quantized_cache(tiny_ckpt, tmp_path, store, kernel):
    cache = _open(tiny_ckpt, tmp_path, bits=3)
    layout = cache.source.layout
    fmt = expert_format(layout.tensors, QuantConfig(expert_bits=3, kernel=kernel), torch.float32, device="cpu")
    assert fmt.describe() == cache.format.describe() and fmt.compute == ("packed" if kernel == "auto" else "dequantize")
    source = QuantizedCacheSource(cache)
    backend = LocalExperts(source, fmt, layout.math, torch.device("cpu"), layout.sparse_layers, layout.num_experts,
                           slots_per_layer=2, store=store)
    assert backend.grouped == (kernel == "auto") and backend.slot_bytes == fmt.compute_layout.nbytes
    g = torch.Generator().manual_seed(0)
    groups = {e: torch.randn(3, 32, generator=g) for e in (1, 4, 6)}  # 3 experts through 2 slots: one eviction
    try:
        outputs = backend.run(1, groups)
    finally:
        backend.close()
        source.close()
    direct = CheckpointSource(Checkpoint(tiny_ckpt), layout, fmt)
    for expert, x in groups.items():
        buf = torch.zeros(fmt.layout.nbytes, dtype=torch.uint8)
        direct.read_into(ExpertKey(1, expert), buf)
        expected = layout.math.forward(fmt.decode(buf), x)
        if kernel == "reference":  # the same arithmetic
            torch.testing.assert_close(outputs[expert], expected, rtol=0, atol=0)
        else:  # 3-bit codes widened into the slot, multiplied by the kernel
            torch.testing.assert_close(outputs[expert], expected, rtol=1e-3, atol=1e-5)
    assert source.bytes_read == 3 * cache.nbytes
