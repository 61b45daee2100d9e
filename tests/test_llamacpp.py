"""The bench's llama.cpp system: the GGUF it writes (read back with gguf's reader), and llama.cpp decoding it
to transformers' greedy tokens (where llama-cpp-python is installed: an optional extra)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from moeshard.benchmarks.bench_model import BenchModelSpec, make_bench_checkpoint

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    spec = BenchModelSpec.of_kind("many-experts", num_hidden_layers=2, hidden_size=128, intermediate_size=64,
                                  num_local_experts=8, dtype="float32")
    return make_bench_checkpoint(tmp_path_factory.mktemp("bench") / "model", spec)


def test_gguf_holds_the_checkpoint_as_llama_cpp_names_it(qwen3_moe, tmp_path):
    from moeshard.benchmarks.llamacpp import write_gguf

    path = write_gguf(qwen3_moe, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = json.loads((qwen3_moe / "config.json").read_text())
    assert fields["general.architecture"] == "qwen3moe"
    assert fields["qwen3moe.block_count"] == 2 and fields["qwen3moe.expert_count"] == 8
    assert fields["qwen3moe.expert_used_count"] == config["num_experts_per_tok"]
    assert fields["qwen3moe.expert_feed_forward_length"] == 64 and len(fields["tokenizer.ggml.tokens"]) == 4096
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for f in qwen3_moe.glob("*.safetensors"):
        state.update(load_file(str(f)))
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    assert list(gate.shape) == [128, 64, 8]  # gguf lists dimensions innermost first: [D, I, E]
    stacked = torch.from_numpy(gate.data.copy()).reshape(8, 64, 128)
    assert torch.equal(stacked[3], state["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_k.weight"].data.copy()).reshape(-1),
                       state["model.layers.0.self_attn.k_proj.weight"].reshape(-1))
    assert len(tensors) == 3 + 2 * 12  # embedding, norm, head; per layer 2 norms, q/k/v/o, q/k norms, router, 3 expert stacks


def test_other_families_are_refused_by_name(tmp_path):
    from moeshard.benchmarks.llamacpp import write_gguf

    ckpt = make_bench_checkpoint(tmp_path / "mixtral", BenchModelSpec.of_kind("mixtral", hidden_size=64,
                                                                              intermediate_size=64,
                                                                              num_hidden_layers=1))
    with pytest.raises(ValueError, match="Qwen3-MoE checkpoints, not 'mixtral'"):
        write_gguf(ckpt, tmp_path / "m.gguf")


@pytest.mark.slow  # llama-cpp-python is an optional extra: this runs where it is installed
def test_llama_cpp_decodes_transformers_greedy_tokens(qwen3_moe, tmp_path):
    pytest.importorskip("llama_cpp", reason="pip install 'moeshard[llamacpp]'")
    from transformers import AutoModelForCausalLM

    from moeshard.benchmarks.bench import decode
    from moeshard.benchmarks.llamacpp import LlamaCppModel, quantize, write_gguf

    source = write_gguf(qwen3_moe, tmp_path / "m-f32.gguf")
    prompt = torch.randint(3, 4096, (1, 8), generator=torch.Generator().manual_seed(1))
    model = LlamaCppModel(source, threads=2)
    got = model.decode(prompt[0].tolist(), 16)
    model.close()
    reference = decode(AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32).eval(), prompt, 16)
    assert got["tokens"] == reference["tokens"] and len(got["step_s"]) == 16
    assert quantize(source, tmp_path / "m-q8.gguf", "Q8_0", threads=2) > 0
    assert quantize(source, tmp_path / "m-q8.gguf", "Q8_0", threads=2) is None  # reused
    q8 = LlamaCppModel(tmp_path / "m-q8.gguf", threads=2)
    assert len(q8.decode(prompt[0].tolist(), 4)["tokens"]) == 5
    q8.close()
