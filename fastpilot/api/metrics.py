"""Prometheus metrics for one app, in a CollectorRegistry of its own.

Each :func:`fastpilot.app.create_app` builds a fresh :class:`Metrics`, so two
apps in one process (tests) never share counters. Request counts and latency
are labelled by the matched route template (``/v1/engines/{engine}/completions``),
never by the raw path, so label cardinality stays bounded. Queue depth and busy
slots are read from each model's ``stats()`` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; completions range from a few ms (tiny model, few tokens) to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _ModelStatsCollector(Collector):
    """Gauges from every loaded model's ``stats()`` dict, read at scrape time."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, model in self._models():
            try:
                stats = model.stats()
            except Exception:  # a model being closed must not break the scrape
                continue
            for key, value in sorted(stats.items()):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric = "fastpilot_model_" + "".join(c if c.isalnum() else "_" for c in key)
                fam = families.get(metric)
                if fam is None:
                    fam = GaugeMetricFamily(
                        metric, f"model stat {key!r} from the backend", labels=["model"]
                    )
                    families[metric] = fam
                fam.add_metric([name], float(value))
        yield from families.values()


class Metrics:
    """The app's counters; ``render()`` gives the exposition text."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fastpilot_requests",
            "HTTP requests by route template and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fastpilot_request_seconds",
            "Time from request to the last byte of the response (streams: until closed)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "fastpilot_tokens",
            "Tokens processed, by model and kind (prompt, completion, cached)",
            ["model", "kind"],
            registry=self.registry,
        )
        self.registry.register(_ModelStatsCollector(models))

    def observe(
        self,
        route: str,
        status: int,
        seconds: float,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if model:
            for kind, count in (
                ("prompt", prompt_tokens),
                ("completion", completion_tokens),
                ("cached", cached_tokens),
            ):
                if count:
                    self.tokens.labels(model, kind).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
