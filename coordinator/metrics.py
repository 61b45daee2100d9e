"""Prometheus metrics for `serve`: request counters and latencies, plus expert-cache and worker figures
read from the runtime at scrape time (so they are never stale and cost nothing per token)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
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


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("moeshard_requests", "HTTP generation requests", ["endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("moeshard_tokens_generated", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("moeshard_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.refusals = Counter("moeshard_http_refusals", "HTTP requests or connections refused before any work, "
                                "by reason (unauthorized, body_too_large, body_timeout, header_timeout, busy)",
                                ["reason"], registry=self.registry)
        self.latency = Histogram("moeshard_request_latency_seconds", "Generation request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_RuntimeCollector(engine))
