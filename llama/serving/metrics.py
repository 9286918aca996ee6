"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llama_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("llama_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llama_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llama_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("llama_queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("llama_active_slots", "Cache slots serving a request", registry=r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.prefix_cache_tokens = Counter(
            "llama_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache (not prefilled again)",
            registry=r,
        )
        self.generation_tokens = Counter("llama_generation_tokens", "Generated tokens", registry=r)
        self.disconnects = Counter("llama_client_disconnects", "Requests whose client went away before the end",
                                   registry=r)
