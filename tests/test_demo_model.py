"""The bundled demo model: it loads offloaded, matches its recorded held-out loss, and writes Python."""
import json

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from moeshard.offload_core import load_model
from moeshard.offload_core.demo import demo_model_path
from moeshard.offload_core.evaluate import cross_entropy

DEMO = demo_model_path()


@pytest.fixture(scope="module")
def report():
    return json.loads((DEMO / "training_report.json").read_text())


def test_demo_model_is_a_small_mixtral(report):
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8
    assert config["num_experts_per_tok"] == 2 and config["num_hidden_layers"] >= 4
    assert 4e6 <= report["parameter_count"] <= 10e6
    size = sum(p.stat().st_size for p in DEMO.iterdir())
    assert size < 16 << 20, f"the demo folder is {size / 2**20:.1f} MiB"


@pytest.mark.slow  # 16k tokens of held-out text
def test_heldout_loss_within_5_percent_of_recorded(report):
    text = (DEMO / "heldout.txt").read_text(encoding="utf-8")
    model = load_model(DEMO, slots_per_layer=2, prefetch=2, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    result = cross_entropy(model.model, tokenizer, text, seq_len=report["seq_len"])
    assert abs(result["loss"] - report["heldout_loss"]) <= 0.05 * report["heldout_loss"], result
    model.close()


def test_demo_writes_python_and_matches_transformers():
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    ref = MixtralForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    model = load_model(DEMO, slots_per_layer=2, prefetch=1, dtype="float32")
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    assert torch.equal(tokens, expected)
    text = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
    assert "\n" in text and any(word in text for word in ("return", "if ", "self", "for ", "=", "("))
    model.close()


@pytest.mark.slow  # quantizes the demo model three times
@pytest.mark.parametrize("attn_bits, expert_bits", [(4, 4), (4, 3), (4, 2)])
def test_packed_kernels_keep_the_reference_paths_greedy_tokens(tmp_path, attn_bits, expert_bits):
    """bf16, the demo's own dtype, every slot resident and with 2 slots per layer: the kernels computing from
    packed codes choose the tokens that dequantize-then-multiply chooses."""
    from moeshard.offload_core import QuantConfig

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    outputs = {}
    for kernel in ("reference", "auto"):
        quant = QuantConfig(attn_bits=attn_bits, expert_bits=expert_bits, kernel=kernel)
        with load_model(DEMO, slots_per_layer=2, prefetch=1, store="ram", cache_dir=tmp_path, quant=quant) as om:
            assert om.runtime.local.describe()["compute"] == ("dequantize" if kernel == "reference" else "packed")
            outputs[kernel] = om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                          do_sample=False)
    assert torch.equal(outputs["auto"], outputs["reference"])
