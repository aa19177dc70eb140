"""Liveness and readiness."""
from __future__ import annotations

import redis
from flask import Blueprint, Response, request

from api import schemas
from api.metrics import render as render_metrics
from api.openapi import operation, query
from api.models import serving
from api.parsing import parse_bool
from api.responses import json_response
from api.services import services
from shared.broker import unreachable
from shared.errors import ChunkStoreUnavailable, PredqError
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
    """Redis, the broker and the chunk store answer (the last two when set apart), and the models load; workers are
    reported (consuming when their canary ran lately), required with workers=true."""
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
    ready &= _check_job_paths(svc, checks)
    consuming = [w for w in states if w.status == "consuming"]
    checks["workers"] = {"ok": bool(consuming), "consuming": len(consuming), "required": need_workers,
                         "workers": [w.to_dict() for w in states]}
    if need_workers:
        ready &= bool(consuming)
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)


def _check_job_paths(svc, checks: dict) -> bool:
    """The broker (when it is not the state Redis) and the chunk store (when one is set): jobs need both."""
    ok = True
    if svc.settings.broker_url != svc.settings.REDIS_URL:
        problem = unreachable(svc.celery)
        checks["broker"] = {"ok": problem is None, **({"message": problem} if problem else {})}
        ok &= problem is None
    if svc.settings.CHUNK_STORE_URL:
        try:
            svc.store.blobs.check()
            checks["chunk_store"] = {"ok": True}
        except ChunkStoreUnavailable as e:
            checks["chunk_store"] = {"ok": False, "message": e.message}
            ok = False
    return ok


@bp.get("/metrics")
@operation("get", "/metrics", summary="Prometheus metrics", responses={200: "text/plain"})
def metrics() -> Response:
    """Workers, queue and jobs read from Redis at scrape time; every web process's requests; this one's batches."""
    return render_metrics(services(), serving())
