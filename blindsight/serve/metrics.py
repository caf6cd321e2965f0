"""bs-serve's Prometheus metrics (``GET /metrics``), in a registry of their own per server.

- ``blindsight_requests_total{code}``: chat-completion requests by HTTP status
  (a stream counts 200 when it starts).
- ``blindsight_requests_rejected_total``: refused because the queue was full (429).
- ``blindsight_requests_cancelled_total``: stopped because the client went away.
- ``blindsight_time_to_first_token_seconds``: from the request's admission to its
  first token (queue wait, images, prompt, vision encoder and prefill).
- ``blindsight_prefill_seconds``: the language model's prefill alone.
- ``blindsight_decode_tokens_per_second``: decode steps after the first token
  (requests with at least two tokens).
- ``blindsight_attention_flops_saved``: attention FLOPs the compiled model's
  categories skipped in the request's prefill (dense minus BlindSight, docs/specification.md §2);
  0 for the dense model.
- ``blindsight_prompt_tokens_total``, ``blindsight_generated_tokens_total``.
- ``blindsight_queue_depth``, ``blindsight_requests_running``: gauges.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
FLOP_BUCKETS = tuple(10.0**e for e in range(3, 16))


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("blindsight_requests", "chat-completion requests by HTTP status", ["code"], registry=r)
        self.rejected = Counter("blindsight_requests_rejected", "requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter("blindsight_requests_cancelled", "requests stopped because the client went away",
                                 registry=r)
        self.ttft = Histogram("blindsight_time_to_first_token_seconds", "admission to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.prefill = Histogram("blindsight_prefill_seconds", "language-model prefill", registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.decode_rate = Histogram("blindsight_decode_tokens_per_second", "decode tokens per second after the first",
                                     registry=r, buckets=RATE_BUCKETS)
        self.flops_saved = Histogram("blindsight_attention_flops_saved", "attention FLOPs saved in the prefill",
                                     registry=r, buckets=FLOP_BUCKETS)
        self.prompt_tokens = Counter("blindsight_prompt_tokens", "prompt tokens", registry=r)
        self.generated_tokens = Counter("blindsight_generated_tokens", "generated tokens", registry=r)
        self.queue_depth = Gauge("blindsight_queue_depth", "requests waiting for a worker", registry=r)
        self.running = Gauge("blindsight_requests_running", "requests being generated", registry=r)

    def observe(self, ttft_s, result, flops_saved: int) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.prefill.observe(result.prefill_s)
        if len(result.token_ids) > 1:
            self.decode_rate.observe(result.tokens_per_s)
        self.flops_saved.observe(flops_saved)
        self.prompt_tokens.inc(result.prefill_tokens)
        self.generated_tokens.inc(len(result.token_ids))
