"""EleutherAI's lm-evaluation-harness against `serve`: its `local-completions` model (token-id prompts, echo with
logprobs for the multiple-choice task, greedy generation with a stop for the other) on the demo model served with
offloaded experts and continuous batching scores exactly what its own `hf` model scores on the same checkpoint, on
the two tasks in benchmarks/lm_eval_tasks. Skipped, with the install line, without the eval extra."""
from __future__ import annotations

import importlib
import importlib.util
import socket
from pathlib import Path

import pytest

from moeshard.coordinator.batching import BatchConfig
from moeshard.coordinator.http_security import ServeConfig
from moeshard.coordinator.server import build_server
from moeshard.offload_core.demo import demo_model_path

from .workers import run_server_in_thread

INSTALL = "pip install -e '.[eval]'"
ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "benchmarks" / "lm_eval_tasks"
SIZES = {"moeshard_next_line": 20, "moeshard_complete_line": 16}
SCORES = {"moeshard_next_line": ("acc,none", "acc_norm,none"), "moeshard_complete_line": ("exact_match,none",)}
# A choice's log-likelihood sums ~10-40 tokens' fp32 log-probabilities, each within 1e-4 of transformers' (checked
# in test_openai_surface); measured here: at most 2e-5 apart.
LOGLIKELIHOOD_ATOL = 1e-3

pytestmark = [pytest.mark.slow,  # two harness runs over 36 documents: ~30 s
              pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                 reason=f"lm-eval is not installed: {INSTALL}")]


def evaluate(model: str, model_args: dict) -> dict:
    lm_eval = importlib.import_module("lm_eval")
    tasks = importlib.import_module("lm_eval.tasks")
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(SIZES), log_samples=True,
                                   task_manager=tasks.TaskManager(include_path=str(TASKS)), bootstrap_iters=0)


def per_document(report: dict, task: str) -> list:
    """Each document's filtered responses, in document order: (log-likelihood, greedy) per choice, or the text."""
    samples = sorted(report["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"] for s in samples]


def test_local_completions_against_serve_scores_what_hf_scores(demo_engine, monkeypatch):
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root, as in the README's command
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(demo_engine, ServeConfig(port=port), log_level="warning",
                          batch=BatchConfig(max_batch=4, max_queue=8))
    thread = run_server_in_thread(server, sock, 60)
    try:
        # num_concurrent 4: the scoring requests are decoded together, as a harness run against a server is
        served = evaluate("local-completions", {
            "base_url": f"http://127.0.0.1:{port}/v1/completions", "model": demo_engine.name,
            "tokenizer_backend": "huggingface", "tokenizer": str(demo_model_path()), "max_length": 512,
            "num_concurrent": 4, "max_retries": 1})
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    reference = evaluate("hf", {"pretrained": str(demo_model_path()), "dtype": "float32", "device": "cpu",
                                "batch_size": 1})

    for task, size in SIZES.items():
        ours, theirs = served["results"][task], reference["results"][task]
        assert ours["sample_len"] == theirs["sample_len"] == size
        for metric in SCORES[task]:
            assert ours[metric] == theirs[metric], (task, metric, ours[metric], theirs[metric])
    for ours, theirs in zip(per_document(served, "moeshard_next_line"), per_document(reference, "moeshard_next_line"),
                            strict=True):
        assert len(ours) == len(theirs) == 4
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs):
            assert abs(ll - ref_ll) <= LOGLIKELIHOOD_ATOL and greedy == ref_greedy
    generated = per_document(served, "moeshard_complete_line")
    assert generated == per_document(reference, "moeshard_complete_line")
    assert any(text[0] for text in generated), "every generation was empty: the comparison shows nothing"
