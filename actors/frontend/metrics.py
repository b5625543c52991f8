"""Prometheus metrics (names prefixed ``pdbus:``), one registry per server, no globals."""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class FrontendMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdbus:requests", "Requests accepted", registry=r)
        self.rejected = Counter("pdbus:requests_rejected", "Requests rejected by validation", registry=r)
        self.finished = Counter("pdbus:request_finished", "Finished choices by reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("pdbus:prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("pdbus:generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("pdbus:time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdbus:inter_token_latency_seconds", "ITL", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdbus:time_per_output_token_seconds", "TPOT", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdbus:e2e_request_latency_seconds", "End to end", buckets=_LATENCY_BUCKETS, registry=r)
        self.backend = Gauge("pdbus:backend", "Backend state (see label)", ["key", "instance"], registry=r)
        self.totals = _Totals()  # the backend's own running totals, as counters
        r.register(self.totals)

    def render(self, stats: dict, totals: list[Total] = ()) -> tuple[bytes, str]:
        _set_stats(self.backend, stats)
        self.totals.totals = list(totals)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Total(NamedTuple):
    """One sample of a counter the backend keeps itself (``pdbus:<name>_total``)."""

    name: str
    doc: str
    labels: dict[str, str]
    value: float


class _Totals:
    """A collector of the backend's totals (set at each scrape): one counter family per name."""

    def __init__(self):
        self.totals: list[Total] = []

    def collect(self):
        families: dict[str, CounterMetricFamily] = {}
        for t in self.totals:
            fam = families.get(t.name)
            if fam is None:
                fam = families[t.name] = CounterMetricFamily(f"pdbus:{t.name}", t.doc, labels=sorted(t.labels))
            fam.add_metric([t.labels[k] for k in sorted(t.labels)], t.value)
        yield from families.values()


def _set_stats(gauge: Gauge, stats: dict, instance: str = "") -> None:
    for key, value in stats.items():
        if isinstance(value, dict):
            _set_stats(gauge, value, instance=key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            gauge.labels(key=key, instance=instance).set(value)


# engine running totals that /metrics also exposes as counters of their own (vLLM's names,
# ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``, with the ``pdbus:`` prefix)
ENGINE_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache",
}


class _EngineCounters:
    """A collector of the engine's own running totals (read from its /stats at each scrape)."""

    def __init__(self):
        self.stats: dict = {}

    def collect(self):
        for key, doc in ENGINE_COUNTERS.items():
            if key in self.stats:
                yield CounterMetricFamily(f"pdbus:{key}", doc, value=self.stats[key])


def instance_metrics_handler(stats_fn, role: str):
    registry = CollectorRegistry()
    gauge = Gauge("pdbus:instance", "Instance state (see label)", ["key", "instance"], registry=registry)
    counters = _EngineCounters()
    registry.register(counters)

    async def handler(request: web.Request) -> web.Response:
        stats = stats_fn()
        counters.stats = stats
        _set_stats(gauge, {k: v for k, v in stats.items() if k != "role"}, instance=role)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
