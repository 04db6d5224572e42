"""Prometheus metrics of one server: requests, errors, latency, batch sizes, queue depth, admitted work.

Each :class:`ServeMetrics` owns its registry (several apps in one process, e.g. tests, do not
collide); ``GET /metrics`` renders it in the Prometheus text format.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows per ONNX Runtime call


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("clipsurgery_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.errors = Counter("clipsurgery_request_errors", "HTTP requests answered with an error",
                              ["route", "code"], registry=r)
        self.latency = Histogram("clipsurgery_request_seconds", "Request latency (seconds)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("clipsurgery_batch_size", "Rows per ONNX Runtime call", ["tower"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("clipsurgery_inference_seconds", "ONNX Runtime time per batch (seconds)",
                                   ["tower"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("clipsurgery_queue_depth", "Items waiting for a batch", ["tower"], registry=r)
        self.in_flight = Gauge("clipsurgery_requests_in_flight", "Requests being answered", registry=r)
        self.admitted = Gauge("clipsurgery_admitted_work", "Work admitted and not finished (image pixels being "
                              "decoded, text bytes being tokenized)", ["budget"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
