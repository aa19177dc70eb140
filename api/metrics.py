"""Prometheus metrics: what the web processes count per request, and the /metrics page that gathers everything.

Under gunicorn, `gunicorn.conf.py` points PROMETHEUS_MULTIPROC_DIR at a directory shared by its processes before
any of them starts: each process writes its counts to its own files there and a scrape of any process sums them
all. Without it (the Flask test client, `flask run`) each app counts in its own process.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator

import redis
from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from api.services import Services
from shared import broker, keys
from shared import metrics as pushed
from shared.workers import worker_states

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the request latency histogram: single predictions take about a millisecond, an
#: upload of a large job minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNMATCHED = "unmatched"  # the route label of a request that matched no route (404, 405)
# Any token is a method to HTTP: others are labelled "other", so that clients cannot add series without end.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Request latency by route, method and status, and predictions by model and version."""

    def __init__(self) -> None:
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # prometheus_client chose where values live when it was imported: follow its choice.
        self.multiprocess_dir = shared_dir if getattr(values.ValueClass, "_multiprocess", False) else None
        if shared_dir and not self.multiprocess_dir:
            log.warning("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported (gunicorn --preload?): "
                        "each web process serves only its own request metrics")
        self._registry = None if self.multiprocess_dir else CollectorRegistry(auto_describe=False)
        self._latency = Histogram(
            "predq_http_request_duration_seconds",
            "Seconds from a request's arrival in the app to its response's headers, by route (the URL rule, "
            "'unmatched' for none), method and status.",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self._registry)
        self._predictions = Counter(
            "predq_predictions", "Rows predicted by the synchronous routes, by model and version.",
            ["model", "version"], registry=self._registry)
        # labels() takes a lock and builds a key on every call; the children are looked up here instead.
        self._latency_children: dict[tuple, Histogram] = {}
        self._prediction_children: dict[tuple, Counter] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self._latency.labels(route, method, str(status))
        child.observe(seconds)

    def count_predictions(self, model: str, version: str, n: int) -> None:
        key = (model, version)
        child = self._prediction_children.get(key)
        if child is None:
            child = self._prediction_children[key] = self._predictions.labels(model, version)
        child.inc(n)

    def collect(self) -> Iterable[Metric]:
        if self.multiprocess_dir:
            return MultiProcessCollector(None, self.multiprocess_dir).collect()
        return self._registry.collect()


def init_app(app: Flask) -> None:
    """Time every request, from before the first `before_request` (auth may answer there) to its response."""
    disable_created_metrics()  # as in multiprocess mode, which has no `_created` series: one page either way
    app.extensions["predq.metrics"] = RequestMetrics()
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_observe)


def _start() -> None:
    g.predq_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started = g.get("predq_started")
    if started is not None:
        rule, method = request.url_rule, request.method
        current_app.extensions["predq.metrics"].observe_request(
            rule.rule if rule is not None else UNMATCHED, method if method in _METHODS else "other",
            response.status_code, time.perf_counter() - started)
    return response


def request_metrics() -> RequestMetrics:
    """The current app's request and prediction counts."""
    return current_app.extensions["predq.metrics"]


def count_predictions(model: str, version: str, n: int) -> None:
    """Count rows a synchronous route predicted."""
    request_metrics().count_predictions(model, version, n)


def queue_length(svc: Services) -> float:
    """Chunk messages waiting in the broker (Redis or RabbitMQ); NaN when the broker does not answer."""
    return broker.queue_length(svc.celery, svc.settings.CHUNK_QUEUE)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _store_families(svc: Services) -> Iterator[Metric]:
    """What Redis says now: workers, the queue, jobs, and the counters the workers pushed."""
    s = svc.settings
    try:
        states = worker_states(svc.redis, stale_after=s.WORKER_STALE_SECONDS, heartbeat_interval=s.HEARTBEAT_INTERVAL)
        queue = queue_length(svc)
        active = svc.redis.scard(keys.ACTIVE_JOBS)
        by_status, oldest_sent = svc.store.active_overview()
        worker_counts = list(pushed.families(svc.redis))
    except redis.RedisError:
        yield _gauge("predq_redis_up", "Whether Redis answered this scrape.", 0)
        return
    now = time.time()
    yield _gauge("predq_redis_up", "Whether Redis answered this scrape.", 1)
    consuming = GaugeMetricFamily("predq_worker_consuming", "1 when the worker's canary task ran lately.",
                                  labels=["worker"])
    heartbeat = GaugeMetricFamily("predq_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.",
                                  labels=["worker"])
    canary = GaugeMetricFamily("predq_worker_canary_age_seconds", "Seconds since a canary task last ran on the worker.",
                               labels=["worker"])
    for w in states:
        consuming.add_metric([w.name], int(w.status == "consuming"))
        if w.heartbeat_age is not None:
            heartbeat.add_metric([w.name], w.heartbeat_age)
        if w.canary_age is not None:
            canary.add_metric([w.name], w.canary_age)
    yield from (consuming, heartbeat, canary)
    yield _gauge("predq_queue_length", "Chunk messages waiting in the broker.", queue)
    yield _gauge("predq_queue_oldest_age_seconds", "Seconds since the oldest chunk message still waiting for a "
                 "worker was sent (0 when none waits).", max(now - oldest_sent, 0.0) if oldest_sent else 0.0)
    yield _gauge("predq_jobs_active", "Jobs not yet in a terminal state.", active)
    jobs = GaugeMetricFamily("predq_jobs", "Jobs not yet in a terminal state, by status.", labels=["status"])
    for status in ("queued", "running"):
        jobs.add_metric([status], by_status.get(status, 0))
    yield jobs
    yield from worker_counts


def _serving_families(serving) -> Iterator[Metric]:
    """Single predictions' cache and micro-batches, counted by the process answering the scrape."""
    cache = serving.cache
    yield CounterMetricFamily(
        "predq_prediction_cache_hits", "Single predictions answered from the prediction cache, in this web "
        "process (each has its own cache).", value=cache.hits if cache else 0)
    yield CounterMetricFamily(
        "predq_prediction_cache_misses", "Single predictions looked up in the prediction cache and not found, "
        "in this web process.", value=cache.misses if cache else 0)
    buckets, batches, rows = serving.batcher.size_histogram()
    yield HistogramMetricFamily("predq_predict_batch_size", "Rows per micro-batched predict call of single "
                                "predictions, in this web process.", buckets=buckets, sum_value=rows)


class _Scrape:
    """Everything one scrape shows, read when the page is written."""

    def __init__(self, svc: Services, serving) -> None:
        self.svc, self.serving = svc, serving

    def collect(self) -> Iterator[Metric]:
        yield from _store_families(self.svc)
        yield from current_app.extensions["predq.metrics"].collect()
        yield from _serving_families(self.serving)


def render(svc: Services, serving) -> Response:
    """The Prometheus text page: Redis state and worker counters, every web process's requests, this one's batches."""
    return Response(generate_latest(_Scrape(svc, serving)), content_type=CONTENT_TYPE_PLAIN_0_0_4)
