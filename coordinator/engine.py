"""The generation engine: one offloaded model, its tokenizer, and timed, streamed generation.

It owns no network and no CLI. Every generation goes through one path, the continuous batching of
`batching.py` (transformers' manager behind one adapter, stop strings and token limits applied in one place):
`serve` and `generate --prompt-file` run a batch of many; `Engine.generate` (one prompt: the CLI, chat, the
demo) runs a batch of one on its own batcher. One `Engine.generate` runs at a time per engine (a lock).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..offload_core.config import OffloadConfig
from ..offload_core.counters import ExpertCounters
from ..offload_core.model import OffloadedModel, load_model, planned_expert_format
from .batching import Batcher, BatchConfig
from .cluster import Cluster, ClusterConfig, check_worker_formats, join_workers
from .sampling import GenerationResult, SamplingParams  # the engine's words: its callers import them from here

logger = logging.getLogger(__name__)


class Engine:
    """An `OffloadedModel` (`om`), its tokenizer, and the cluster of workers joined to it (if any)."""

    def __init__(self, om: OffloadedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 cluster: Cluster | None = None):
        self.om, self.tokenizer, self.name, self.cluster = om, tokenizer, name, cluster
        self.model = om.model  # transformers' model
        self._lock = threading.Lock()
        self._batcher = None  # a batch of one for `generate`, started on first use

    @classmethod
    def load(cls, path: str | Path, offload: OffloadConfig = OffloadConfig(), cluster: ClusterConfig | None = None,
             progress: bool = True, name: str | None = None) -> Engine:
        """`name` is the model's name to clients (default: the folder's)."""
        if cluster is not None:  # a worker whose expert format differs is refused before anything is quantized
            check_worker_formats(cluster, planned_expert_format(path, offload))
        om = load_model(path, offload, progress=progress)
        try:
            tokenizer = AutoTokenizer.from_pretrained(Path(path))
            engine = cls(om, tokenizer, name or Path(path).name)
            if cluster is not None:
                engine.cluster = join_workers(om, cluster, progress=progress)
        except BaseException:
            om.close()
            raise
        return engine

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        self.om.close()

    def worker_stats(self) -> dict:
        """Per worker: the coordinator's view (requests, RPC latency, bytes) and the worker's own counters."""
        if self.cluster is None:
            return {}
        out = self.cluster.describe()
        for name, backend in self.cluster.workers.items():
            run = ExpertCounters.total(backend.layer_counters().values())  # this coordinator's calls only
            out[name]["run_hits"], out[name]["run_misses"] = run.hits, run.misses
            try:
                out[name]["worker"] = backend.worker_stats()
            except Exception as exc:  # stats are best effort: a worker that went away must not fail a reply
                out[name]["worker"] = {"error": str(exc)}
        return out

    @property
    def device(self) -> torch.device:
        return self.om.device

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes and scores: its logits' width (may exceed the tokenizer's, padded)."""
        return int(self.model.config.vocab_size)

    def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat messages through the tokenizer's chat template, or plain concatenation when it has none."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "".join(m["content"] if isinstance(m["content"], str) else "" for m in messages)
        return self.encode_prompt(text)

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """One prompt, as a batch of one through the same continuous batching as `serve`: `on_text` gets the text
        as it is decoded; setting `cancel` stops at the next token and returns what was made so far."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        if self.context_length and len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"context length of {self.context_length} tokens"
            )
        with self._lock:
            if self._batcher is None:
                self._batcher = Batcher(self, BatchConfig(max_batch=1, max_queue=0))
                self._batcher.start()
            runtime = self.om.runtime
            before = runtime.stats().total
            start = time.perf_counter()
            result = asyncio.run(self._batcher.generate(prompt_ids, params, on_text, interrupt=cancel))
            end = time.perf_counter()
            runtime.reset_prediction()
            result.stats = _generation_stats(result.token_times, start, end, len(prompt_ids), before, runtime.stats())
            result.stats["workers"] = self.worker_stats()
            return result


def _generation_stats(times: list[float], start: float, end: float, prompt_tokens: int, before: ExpertCounters,
                      after) -> dict:
    delta = after.total - before  # this generation's share of the counters
    n = len(times)
    prefill_s = (times[0] - start) if times else end - start
    decode_s = (times[-1] - times[0]) if n > 1 else 0.0
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": n,
        "wall_s": end - start,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_tokens / prefill_s if prefill_s > 0 else None,
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else None,
        "hit_rate": delta.hit_rate,
        "prefetch_recall": delta.prefetch_recall,
        "prefetch_precision": delta.prefetch_precision,
        "bytes_loaded": delta.bytes_loaded,
        "experts": after.as_dict(),
    }
