"""The generation engine: one offloaded model, its tokenizer, and timed, streamed generation.

It owns no network and no CLI: the CLI and the HTTP server call `Engine.generate`. Generation is
transformers' own `generate()`; moeshard only times it and streams the text. One generation runs at a
time per engine (a lock), so concurrent callers never share a KV cache.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextStreamer

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


class _TimedStreamer(TextStreamer):
    """transformers' TextStreamer, sending finished text to a callback and timing each token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.token_times: list[float] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.token_times.append(time.perf_counter())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.on_text is not None and text:
            self.on_text(text)


class _Cancelled(StoppingCriteria):
    """Stops generation when the caller gives up (e.g. an HTTP client disconnected)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    """An `OffloadedModel` (`om`), its tokenizer, and the cluster of workers joined to it (if any)."""

    def __init__(self, om: OffloadedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 cluster: Cluster | None = None):
        self.om, self.tokenizer, self.name, self.cluster = om, tokenizer, name, cluster
        self.model = om.model  # transformers' model
        self._lock = threading.Lock()

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
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        if self.context_length and len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"context length of {self.context_length} tokens"
            )
        with self._lock:
            return self._generate(prompt_ids, params, on_text, cancel)

    def _generate(self, prompt_ids, params, on_text, cancel) -> GenerationResult:
        runtime = self.om.runtime
        before = runtime.stats().total
        streamer = _TimedStreamer(self.tokenizer, on_text)
        kwargs = dict(max_new_tokens=params.max_new_tokens, streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.model.generation_config.eos_token_id)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if cancel is not None:
            kwargs.update(stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        if params.seed is not None:
            torch.manual_seed(params.seed)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        end = time.perf_counter()
        runtime.reset_prediction()
        new_ids = output[0, len(prompt_ids):].tolist()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        finish = "stop" if len(new_ids) < params.max_new_tokens or (new_ids and new_ids[-1] in eos_ids) else "length"
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if params.stop:
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        stats = _generation_stats(streamer.token_times, start, end, len(prompt_ids), before, runtime.stats())
        stats["workers"] = self.worker_stats()
        return GenerationResult(text, new_ids, len(prompt_ids), finish, stats)


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
