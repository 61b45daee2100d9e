"""Prometheus metrics for `serve`: request counters and latencies, plus expert-cache and worker figures
read from the runtime at scrape time (so they are never stale and cost nothing per token)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .remote import LATENCY_BUCKETS_S

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _RuntimeCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.om.stats()
        total = stats.total
        for name, value, doc in (("moeshard_expert_cache_hit_rate", total.hit_rate, "Expert cache hits / lookups"),
                                 ("moeshard_prefetch_recall", total.prefetch_recall, "Needed experts that were predicted"),
                                 ("moeshard_prefetch_precision", total.prefetch_precision,
                                  "Predicted experts that were needed")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value if value is not None else float("nan"))
            yield g
        for key, value, doc in (("hits", total.hits, "Expert cache hits"), ("misses", total.misses, "Expert cache misses"),
                                ("bytes_loaded", total.bytes_loaded, "Expert bytes moved into slots")):
            c = CounterMetricFamily(f"moeshard_expert_{key}", doc)
            c.add_metric([], value)
            yield c
        p50 = GaugeMetricFamily("moeshard_worker_rpc_latency_p50_seconds", "Median RunExperts latency", labels=["worker"])
        p99 = GaugeMetricFamily("moeshard_worker_rpc_latency_p99_seconds", "99th percentile RunExperts latency",
                                labels=["worker"])
        requests = CounterMetricFamily("moeshard_worker_requests", "RunExperts sent", labels=["worker"])
        failures = CounterMetricFamily("moeshard_worker_failures", "RPCs to a worker that failed or timed out",
                                       labels=["worker"])
        up = GaugeMetricFamily("moeshard_worker_up", "1 while a worker serves its experts, 0 while it is down, "
                               "being probed or receiving its experts", labels=["worker"])
        pushed = CounterMetricFamily("moeshard_worker_pushed_bytes", "Expert bytes sent to a worker", labels=["worker"])
        latency = HistogramMetricFamily("moeshard_worker_rpc_latency_seconds", "RunExperts round trips",
                                        labels=["worker"])
        cluster = self.engine.cluster
        for name, backend in stats.backends.items():
            if "rpc_p50_ms" not in backend:
                continue
            for family, key in ((p50, "rpc_p50_ms"), (p99, "rpc_p99_ms")):
                family.add_metric([name], backend[key] / 1e3 if backend[key] is not None else float("nan"))
            requests.add_metric([name], backend["requests"])
            failures.add_metric([name], backend.get("failures", 0))
            up.add_metric([name], 1.0 if backend.get("state") == "serving" else 0.0)
            pushed.add_metric([name], backend.get("pushed_bytes", 0))
            if cluster is not None and name in cluster.workers:
                counts, total = cluster.workers[name].latency_histogram()
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], counts):
                    cumulative += count
                    buckets.append((bound, cumulative))
                latency.add_metric([name], buckets, total)
        yield from (p50, p99, requests, failures, up, pushed, latency)


_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOK_S_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServerMetrics:
    def __init__(self, engine, batcher=None):
        self.registry = CollectorRegistry()
        self.requests = Counter("moeshard_requests", "HTTP generation requests by outcome (status): ok, cancelled "
                                "(the client went away), error (generation failed), rejected (refused before any "
                                "work: invalid or overloaded)", ["endpoint", "status"], registry=self.registry)
        self.rejections = Counter("moeshard_request_rejections", "Generation requests refused before any work, by "
                                  "reason (invalid, overloaded)", ["reason"], registry=self.registry)
        self.ttft = Histogram("moeshard_time_to_first_token_seconds", "From a request's arrival in the batcher to "
                              "its first token (queueing and prefill)", buckets=_TTFT_BUCKETS, registry=self.registry)
        self.stream_tok_s = Histogram("moeshard_stream_decode_tokens_per_second", "Per request: tokens/s after the "
                                      "first token", buckets=_TOK_S_BUCKETS, registry=self.registry)
        batch_buckets = tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, 256}))
        self.batch_size = Histogram("moeshard_batch_size", "Sequences in each decoding step", buckets=batch_buckets,
                                    registry=self.registry)
        self.step_tokens = Histogram("moeshard_step_tokens", "Tokens computed in each step (prefill chunks plus one "
                                     "per decoding sequence)", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                                     registry=self.registry)
        self.step_seconds = Histogram("moeshard_step_seconds", "Duration of each step", buckets=_STEP_BUCKETS,
                                      registry=self.registry)
        self.queue_depth = Histogram("moeshard_queue_depth", "Requests waiting for a place in the batch, seen at "
                                     "each step", buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        if batcher is not None:
            Gauge("moeshard_batch_active", "Sequences in the batch now", registry=self.registry).set_function(
                lambda: batcher.active)
            Gauge("moeshard_batch_queued", "Requests waiting for a place in the batch now",
                  registry=self.registry).set_function(lambda: batcher.queued)
            Gauge("moeshard_requests_in_flight", "Requests admitted and not finished (in the batch or waiting)",
                  registry=self.registry).set_function(lambda: len(batcher.live))
        self.tokens = Counter("moeshard_tokens_generated", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("moeshard_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.refusals = Counter("moeshard_http_refusals", "HTTP requests or connections refused before any work, "
                                "by reason (unauthorized, body_too_large, body_timeout, header_timeout, busy)",
                                ["reason"], registry=self.registry)
        self.latency = Histogram("moeshard_request_latency_seconds", "Generation request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_RuntimeCollector(engine))
