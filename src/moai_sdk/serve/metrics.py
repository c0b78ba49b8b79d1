"""Prometheus metrics of the server (``GET /metrics``), in a registry of their own per app.

* ``moai_requests_total{endpoint, status}`` -- answered requests by HTTP status (429s and 504s included);
* ``moai_queue_depth`` -- requests waiting for the model; ``moai_running_requests`` -- rows in the running batch;
* ``moai_batch_size`` -- rows per pipeline call (histogram; ``_count`` is the number of calls);
* ``moai_stage_seconds{stage}`` -- the pipeline's stage timings per call (experts, vision, prefill, decode, ...);
* ``moai_request_seconds{endpoint}`` -- latency as the client sees it, from arrival to the last byte;
  ``moai_queue_wait_seconds`` -- arrival to the start of the request's batch;
* ``moai_time_to_first_token_seconds`` -- arrival to the first streamed text;
* ``moai_prompt_tokens_total`` / ``moai_generated_tokens_total`` -- the tokens of the ``usage`` objects;
* on the engine (:mod:`moai_sdk.engine`): ``moai_running_requests`` are the rows decoding, ``moai_waiting_requests``
  the requests waiting for perception or a KV slot, ``moai_kv_cache_bytes{state="used"|"reserved"|"allocated"}``
  the KV pool, ``moai_step_seconds`` one engine step (decode for every running row plus admissions),
  ``moai_time_to_first_token_seconds`` arrival to the first generated token and ``moai_inter_token_seconds`` the
  time between a request's consecutive tokens; ``moai_batch_size`` counts the requests admitted by one step.
"""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    """The server's counters, gauges and histograms; :meth:`render` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moai_requests", "Answered requests by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.queue_depth = Gauge("moai_queue_depth", "Requests waiting for the model", registry=r)
        self.running = Gauge("moai_running_requests", "Rows of the batch the model is running", registry=r)
        self.batch_size = Histogram(
            "moai_batch_size", "Rows per batched pipeline call", buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "moai_stage_seconds", "Pipeline stage time per batched call", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "moai_request_seconds",
            "Request latency, arrival to response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "moai_queue_wait_seconds",
            "Arrival to the start of the request's batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "moai_time_to_first_token_seconds",
            "Arrival to the first streamed text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("moai_waiting_requests", "Requests waiting for perception or a KV slot", registry=r)
        kv = Gauge("moai_kv_cache_bytes", "KV cache pool bytes", ["state"], registry=r)
        self.kv_used, self.kv_reserved, self.kv_allocated = (
            kv.labels(state="used"),
            kv.labels(state="reserved"),
            kv.labels(state="allocated"),
        )
        self.step_seconds = Histogram(
            "moai_step_seconds", "One engine step (all running rows)", buckets=STEP_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            "moai_inter_token_seconds", "Time between a request's consecutive tokens", buckets=STEP_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("moai_prompt_tokens", "Prompt tokens (text + image + auxiliary)", registry=r)
        self.generated_tokens = Counter("moai_generated_tokens", "Generated (completion) tokens", registry=r)

    def answered(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if seconds is not None:
            self.request_seconds.labels(endpoint=endpoint).observe(seconds)

    def batch(self, size: int, timings: Mapping[str, float]) -> None:
        self.batch_size.observe(size)
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage=stage).observe(float(seconds))

    def request_stages(self, timings: Mapping[str, float]) -> None:
        """One request's stage timings (the engine times each request on its own)."""
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage=stage).observe(float(seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)
