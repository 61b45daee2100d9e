"""Shared fixtures: tiny random Mixtral checkpoints written with save_pretrained, transformers' reference model,
a tiny tokenizer, and the cleanup of any child process a test left running."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

NUM_EXPERTS = 8


def tiny_config(**overrides) -> MixtralConfig:
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def make_checkpoint(path, seed: int = 0, shard_size: str | None = None, **overrides):
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(**overrides)).eval()
    # Random init gives near-uniform routers; sharpen them so routing has structure like a trained model.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8.0)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_sharded_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_sharded"), seed=1, shard_size="20KB")


@pytest.fixture(scope="session")
def reference():
    """transformers' own model for a checkpoint folder, cached per folder."""
    cache = {}

    def load(path):
        if path not in cache:
            cache[path] = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return load


TOKENIZER_TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
                  "        self.x = x\n        self.y = y\n\nfor i in range(10):\n    print(i)\n") * 20


@functools.lru_cache(maxsize=4)
def demo_greedy(prompt: str, new_tokens: int):
    """(prompt ids, transformers' greedy tokens after them in fp32, experts per layer) on the bundled demo model."""
    from transformers import AutoTokenizer

    from moeshard.offload_core.demo import demo_model_path

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ref = MixtralForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
    return ids, tokens, ref.config.num_local_experts


def save_tiny_tokenizer(path, vocab_size: int = 300, chat_template: str | None = None) -> None:
    """A byte-level BPE tokenizer trained here, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_tok_ckpt(tmp_path_factory):
    """A tiny checkpoint with a tokenizer (vocab 300; pad 0, bos 1, eos 2), for CLI and server tests."""
    path = make_checkpoint(tmp_path_factory.mktemp("tiny_tok"), seed=5, vocab_size=300, pad_token_id=0)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def demo_engine():
    """The trained demo model in fp32, its experts offloaded (4 of 8 slots per layer, prefetch 1), with its
    tokenizer: the real routing that user-facing options must survive."""
    from moeshard.coordinator.engine import Engine
    from moeshard.offload_core import OffloadConfig
    from moeshard.offload_core.demo import demo_model_path

    engine = Engine.load(demo_model_path(), OffloadConfig(dtype="float32", slots_per_layer=4, prefetch=1),
                         progress=False)
    yield engine
    engine.close()


@pytest.fixture(autouse=True, scope="session")
def kill_leftover_children():
    """Worker processes are stopped by the tests that start them; any a failing test left behind is killed here,
    by pid, so a red run does not leave servers holding ports and memory."""
    yield
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
