"""moe-coordinator's CLI: greedy parity with transformers, streaming, chat, and one-line errors."""
import io
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moeshard.cli import main

PROMPT = "def add(a, b):"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_greedy_equals_transformers(tiny_tok_ckpt, reference, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_tok_ckpt), "--prompt", PROMPT,
                           "--max-new-tokens", "24", "--temperature", "0", "--json", "--quiet",
                           "--slots-per-layer", "1", "--prefetch", "2")
    assert code == 0
    result = json.loads(out)
    tok = AutoTokenizer.from_pretrained(tiny_tok_ckpt)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    expected = reference(tiny_tok_ckpt).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                                 do_sample=False, pad_token_id=0)
    assert result["token_ids"] == expected[0, ids.shape[1]:].tolist()
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)
    stats = result["stats"]
    assert stats["new_tokens"] == len(result["token_ids"])
    assert 0 <= stats["hit_rate"] <= 1 and 0 <= stats["prefetch_recall"] <= 1


def test_generate_streams_text_and_summary(tiny_tok_ckpt, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_tok_ckpt), "--prompt", PROMPT,
                           "--max-new-tokens", "12", "--quiet")
    assert code == 0
    assert out.startswith(PROMPT)
    summary = out.strip().splitlines()[-1]
    assert "tok/s" in summary and "expert cache hit rate" in summary and "prefetch recall" in summary


@pytest.mark.slow  # seconds: a subprocess, or several generations
def test_sampling_is_repeatable_with_a_seed(tiny_tok_ckpt, capsys):
    argv = ["generate", "--model", str(tiny_tok_ckpt), "--prompt", PROMPT, "--max-new-tokens", "16", "--json",
            "--quiet", "--temperature", "1.5", "--top-p", "0.9", "--seed", "7"]
    first = json.loads(run_cli(capsys, *argv)[1])["token_ids"]
    second = json.loads(run_cli(capsys, *argv)[1])["token_ids"]
    other = json.loads(run_cli(capsys, *argv[:-1], "8")[1])["token_ids"]
    assert first == second
    assert first != other


def test_chat_plain_continuation(tiny_tok_ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(a, b):\nclass Point:\n/exit\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(tiny_tok_ckpt), "--max-new-tokens", "8", "--quiet")
    assert code == 0
    assert "plain continuation" in err
    assert len(out.strip().splitlines()) >= 1


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--model", "/nonexistent/folder"], "model folder '/nonexistent/folder' does not exist"),
    (["generate", "--prompt", "x", "--slots-per-layer", "9"], "slots_per_layer must be <= 8"),
])
def test_bad_input_is_one_line(tiny_tok_ckpt, capsys, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_tok_ckpt)]
    code, out, err = run_cli(capsys, *argv, "--quiet")
    assert code == 2
    assert err.strip().splitlines() == [f"moe-coordinator: error: {err.strip().split('error: ', 1)[1]}"]
    assert message in err
    assert "Traceback" not in err


def test_non_moe_folder(tmp_path, capsys):
    from .conftest import save_tiny_tokenizer

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--model", str(tmp_path), "--quiet")
    assert code == 2
    assert "model_type 'llama' is not a Mixture-of-Experts family moeshard can run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # a fresh interpreter
def test_console_script_bad_flag_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "moeshard", "generate", "--prompt", "x", "--prefetch", "many"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "argument --prefetch: expected a whole number, got 'many'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # every command's --help
def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "-m", "moeshard", "generate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--device",
                 "--slots-per-layer", "--prefetch", "--json", "--quiet"):
        assert flag in proc.stdout


def test_help_shows_every_default():
    """Issue 21.7: each option that has a default says it in --help (--policy, --attn-bits and --expert-bits did
    not), on every moe-coordinator command and on moe-worker."""
    import argparse

    from moeshard.coordinator.cli import build_parser
    from moeshard.worker.cli import build_parser as worker_parser

    parsers = dict(build_parser()[1].choices) | {"moe-worker": worker_parser()}
    silent = [(name, action.option_strings[0]) for name, parser in parsers.items() for action in parser._actions
              if action.option_strings and action.default not in (None, argparse.SUPPRESS)
              and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._VersionAction))
              and action.help != argparse.SUPPRESS and "default" not in (action.help or "")]
    assert not silent, f"options whose --help does not state their default: {silent}"
