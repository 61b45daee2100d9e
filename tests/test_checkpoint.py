"""Checkpoint reading: laziness (bytes actually read), fingerprint, and clear errors for bad folders."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from moeshard.offload_core import Checkpoint, CheckpointError, load_model

from .conftest import NUM_EXPERTS, make_checkpoint


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """A checkpoint whose experts are ~60x the dense weights and ~100x what k=1 slots hold."""
    return make_checkpoint(tmp_path_factory.mktemp("wide"), seed=3, hidden_size=64, intermediate_size=512,
                           num_hidden_layers=6, shard_size="2MB")


def test_reader_loads_only_the_experts_it_needs(wide_ckpt):
    ckpt = Checkpoint(wide_ckpt)
    expert_names = [n for n in ckpt.names if ".experts." in n]
    nbytes = {n: 4 * torch.Size(ckpt.shape(n)).numel() for n in ckpt.names}  # float32 checkpoint
    expert_bytes = sum(nbytes[n] for n in expert_names)
    dense_bytes = sum(nbytes[n] for n in ckpt.names if n not in expert_names)
    assert ckpt.bytes_read == 0  # opening reads headers only
    model = load_model(wide_ckpt, slots_per_layer=1, prefetch=0, store="disk")
    ckpt = model.checkpoint
    assert ckpt.bytes_read == dense_bytes  # loading reads no expert at all
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    stats = model.stats().total
    one_expert = expert_bytes // (NUM_EXPERTS * 6)
    assert ckpt.bytes_read - dense_bytes == stats.misses * one_expert
    assert stats.misses <= 6 * 6  # at most 3 tokens x top-2 per layer
    assert ckpt.bytes_read - dense_bytes <= expert_bytes * 36 // 48  # never more than the experts routed to


def test_fingerprint_is_stable_and_sensitive(tiny_ckpt, tmp_path):
    a, b = Checkpoint(tiny_ckpt), Checkpoint(tiny_ckpt)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint({"expert_bits": 2}) != a.fingerprint({"expert_bits": 3})
    copy = shutil.copytree(tiny_ckpt, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert Checkpoint(copy).fingerprint() != a.fingerprint()


def test_fused_expert_layout_is_read_too(tiny_ckpt, tmp_path, reference):
    """A checkpoint saved with transformers' fused names (gate_up_proj / down_proj) gives the same model."""
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    fused = {}
    for name, tensor in state.items():
        if ".experts." not in name:
            fused[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for layer in range(3):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up = [torch.cat([state[f"{p}.{e}.w1.weight"], state[f"{p}.{e}.w3.weight"]]) for e in range(NUM_EXPERTS)]
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [state[f"{p}.{e}.w2.weight"] for e in range(NUM_EXPERTS)])
    out = tmp_path / "fused"
    out.mkdir()
    shutil.copy(tiny_ckpt / "config.json", out / "config.json")
    save_file(fused, str(out / "model.safetensors"))
    ids = torch.tensor([[1, 7, 21, 40]])
    model = load_model(out, slots_per_layer=2, prefetch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(tiny_ckpt)(ids).logits, atol=1e-5, rtol=0)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json' not found: expected a Hugging Face model folder"):
        load_model(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_non_moe_model(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type 'llama' is not a Mixture-of-Experts family moeshard can run"):
        load_model(tmp_path)


def test_missing_expert_tensor(tiny_ckpt, tmp_path):
    out = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight'"):
        load_model(out)


def test_missing_dense_tensor(tiny_ckpt, tmp_path):
    out = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.self_attn\.k_proj\.weight'"):
        load_model(out)


def test_no_safetensors(tiny_ckpt, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    shutil.copy(tiny_ckpt / "config.json", out / "config.json")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors file"):
        load_model(out)


@pytest.mark.parametrize("k, message", [(0, "slots_per_layer must be >= 1"),
                                        (NUM_EXPERTS + 1, f"slots_per_layer must be <= {NUM_EXPERTS}"),
                                        (-1, "slots_per_layer must be >= 1")])
def test_bad_slot_counts(tiny_ckpt, k, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_ckpt, slots_per_layer=k)


def test_bad_prefetch_and_store(tiny_ckpt):
    with pytest.raises(ValueError, match=f"prefetch must be <= {NUM_EXPERTS}"):
        load_model(tiny_ckpt, prefetch=NUM_EXPERTS + 1)
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        load_model(tiny_ckpt, prefetch=-1)
    with pytest.raises(ValueError, match=r"store must be one of \['disk', 'ram'\]"):
        load_model(tiny_ckpt, store="tape")


def test_stats_dict_and_table(tiny_ckpt):
    model = load_model(tiny_ckpt, slots_per_layer=2, prefetch=2)
    model.generate(torch.tensor([[1, 4, 9]]), max_new_tokens=8, do_sample=False)
    stats = model.stats().as_dict()
    assert sorted(stats["layers"]) == [0, 1, 2]
    total = stats["total"]
    for key in ("hits", "misses", "prefetch_issued", "prefetch_used", "bytes_loaded", "wait_s", "compute_s",
                "hit_rate", "prefetch_recall", "prefetch_precision"):
        assert key in total
    assert total["hits"] == sum(layer["hits"] for layer in stats["layers"].values())
    assert stats["layers"][0]["predicted"] == 0  # nothing predicts the first layer
    assert 0 <= total["prefetch_recall"] <= 1 and 0 <= total["hit_rate"] <= 1
    table = model.format_stats()
    assert table.splitlines()[0].split()[0] == "layer" and table.splitlines()[-1].startswith("total")
