"""Liveness and readiness."""
from __future__ import annotations

import redis
from flask import Blueprint, Response, request

from api import schemas
from api.openapi import operation, query
from api.models import serving
from api.parsing import parse_bool
from api.responses import json_response
from api.services import services
from shared import keys
from shared.broker import queue_length
from shared.errors import PredqError
from shared.workers import worker_states

bp = Blueprint("health", __name__)



@bp.get("/healthz")
@operation("get", "/healthz", summary="Liveness", responses={200: schemas.Health})
def healthz() -> Response:
    """200 while the process serves."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
@operation("get", "/readyz", summary="Readiness",
           params=[query("workers", {"type": "boolean"}, "Also require a worker that proved it is consuming.")],
           responses={200: schemas.Readiness, 400: None, 503: schemas.Readiness})
def readyz() -> Response:
    """Redis answers and the models load; workers are reported (consuming when their canary ran lately), required with workers=true."""
    svc = services()
    need_workers = parse_bool("workers", request.args.get("workers"))
    checks: dict = {}
    ready = True
    states = []
    try:
        svc.redis.ping()
        states = worker_states(svc.redis, stale_after=svc.settings.WORKER_STALE_SECONDS,
                               heartbeat_interval=svc.settings.HEARTBEAT_INTERVAL)
        checks["redis"] = {"ok": True}
    except redis.RedisError as e:
        checks["redis"] = {"ok": False, "message": f"Redis does not answer: {type(e).__name__}"}
        ready = False
    names = svc.registry.names()
    unloadable = []
    for name in names:
        try:
            svc.registry.get(name)  # loads a version deployed since the last request; cached after that
        except PredqError:
            unloadable.append(name)
    checks["models"] = {"ok": not unloadable, "deployed": len(names), "loaded": len(names) - len(unloadable)}
    if unloadable:
        checks["models"]["message"] = f"cannot load: {', '.join(unloadable)}"
    consuming = [w for w in states if w.status == "consuming"]
    checks["workers"] = {"ok": bool(consuming), "consuming": len(consuming), "required": need_workers,
                         "workers": [w.to_dict() for w in states]}
    if need_workers:
        ready &= bool(consuming)
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)


def _metric(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")


def _serving_metrics(lines: list[str]) -> None:
    """Single predictions: cache hits and misses, micro-batch sizes, counted by the process answering the scrape."""
    sv = serving()
    cache = sv.cache
    _metric(lines, "predq_prediction_cache_hits_total", "counter",
            "Single predictions answered from the prediction cache, in this web process (each has its own cache).",
            [({}, cache.hits if cache else 0)])
    _metric(lines, "predq_prediction_cache_misses_total", "counter",
            "Single predictions looked up in the prediction cache and not found, in this web process.",
            [({}, cache.misses if cache else 0)])
    buckets, batches, rows = sv.batcher.size_histogram()
    lines.append("# HELP predq_predict_batch_size Rows per micro-batched predict call of single predictions, "
                 "in this web process.")
    lines.append("# TYPE predq_predict_batch_size histogram")
    lines.extend(f'predq_predict_batch_size_bucket{{le="{le}"}} {count}' for le, count in buckets)
    lines.append(f"predq_predict_batch_size_sum {rows}")
    lines.append(f"predq_predict_batch_size_count {batches}")


@bp.get("/metrics")
@operation("get", "/metrics", summary="Prometheus metrics", responses={200: "text/plain"})
def metrics() -> Response:
    """Worker liveness, queue length and active jobs read at scrape time; this process's single-prediction counters."""
    svc = services()
    lines: list[str] = []
    try:
        states = worker_states(svc.redis, stale_after=svc.settings.WORKER_STALE_SECONDS,
                               heartbeat_interval=svc.settings.HEARTBEAT_INTERVAL)
        queue = queue_length(svc.celery, svc.settings.CHUNK_QUEUE)
        active = svc.redis.scard(keys.ACTIVE_JOBS)
        commits = svc.store.worker_commits()
        up = 1
    except redis.RedisError:
        states, queue, active, commits, up = [], 0, 0, {}, 0
    _metric(lines, "predq_redis_up", "gauge", "Whether Redis answered this scrape.", [({}, up)])
    _metric(lines, "predq_worker_consuming", "gauge", "1 when the worker's canary task ran lately.",
            [({"worker": w.name}, int(w.status == "consuming")) for w in states])
    _metric(lines, "predq_worker_heartbeat_age_seconds", "gauge", "Seconds since the worker's last heartbeat.",
            [({"worker": w.name}, w.heartbeat_age) for w in states if w.heartbeat_age is not None])
    _metric(lines, "predq_worker_canary_age_seconds", "gauge", "Seconds since a canary task last ran on the worker.",
            [({"worker": w.name}, w.canary_age) for w in states if w.canary_age is not None])
    _metric(lines, "predq_queue_length", "gauge", "Chunk messages waiting in the broker.", [({}, queue)])
    _metric(lines, "predq_jobs_active", "gauge", "Jobs not yet in a terminal state.", [({}, active)])
    _metric(lines, "predq_chunks_committed_total", "counter", "Chunks the worker committed, all jobs together.",
            [({"worker": name}, count) for name, count in sorted(commits.items())])
    _serving_metrics(lines)
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
