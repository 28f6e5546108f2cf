"""Prometheus metrics of a herd server (``GET /metrics``), one registry per app so that several apps (tests) do not
share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from herd.serve.scheduler import Scheduler

disable_created_metrics()  # the *_created series only double what a scrape already knows
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, scheduler: Scheduler):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("herd_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("herd_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("herd_request_latency_seconds", "Time from a generation request to its last token",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from a request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("herd_queue_depth", "Sequences waiting for a batch row", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("herd_running_sequences", "Sequences in the decode batch or in prefill", registry=r).set_function(
            lambda: scheduler.n_running)
        Gauge("herd_decode_steps", "Decode steps run since start (batched forwards)", registry=r).set_function(
            lambda: scheduler.stats.decode_steps)
        Gauge("herd_max_batch", "Decode batch rows", registry=r).set(scheduler.max_batch)
        self.guard_verdicts = Counter(
            "herd_guard_verdicts", "Shield checks by stage, outcome (safe, unsafe, error) and category (one count per "
            "code of a verdict; 'none' when it has none)", ["stage", "verdict", "category"], registry=r)
        self.guard_latency = Histogram("herd_guard_latency_seconds", "Time of one shield check", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)

    def record_verdict(self, v) -> None:
        """Count a herd.safety.shield.ShieldVerdict."""
        outcome = "error" if v.error else "unsafe" if v.blocked else "safe"
        for category in v.categories or ["none"]:
            self.guard_verdicts.labels(v.stage, outcome, category).inc()
        self.guard_latency.labels(v.stage).observe(v.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
