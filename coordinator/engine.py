"""The generation engine: one offloaded model, its tokenizer, and timed, streamed generation.

It owns no network and no CLI. Every generation goes through one path, the continuous batching of
`batching.py` (transformers' manager behind one adapter, stop strings and token limits applied in one place):
`serve` and `generate --prompt-file` run a batch of many; `Engine.generate` (one prompt: the CLI, chat, the
demo) runs a batch of one on its own batcher. One `Engine.generate` runs at a time per engine (a lock).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..offload_core.config import OffloadConfig
from ..offload_core.counters import ExpertCounters
from ..offload_core.model import OffloadedModel, load_model, planned_expert_format
from .cluster import Cluster, ClusterConfig, check_worker_formats, join_workers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, 0 < top_p <= 1
    seed: int | None = None  # makes sampling repeatable
    stop: tuple[str, ...] = ()  # stop when the text ends with one of these

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each new token was decoded


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

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Chat messages through the tokenizer's chat template, or plain concatenation when it has none."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "".join(m["content"] if isinstance(m["content"], str) else "" for m in messages)
        return self.encode_prompt(text)

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """One prompt, as a batch of one through the same continuous batching as `serve`: `on_text` gets the text
        as it is decoded; setting `cancel` stops at the next token and returns what was made so far."""
        import asyncio

        from .batching import Batcher, BatchConfig

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
