"""Liveness and readiness."""
from __future__ import annotations

import time

import orjson
import redis
from flask import Blueprint, Response, request

from api import schemas
from api.openapi import operation, query
from api.parsing import parse_bool
from api.services import services
from shared import keys
from shared.errors import PredqError

bp = Blueprint("health", __name__)


def _json(payload: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


@bp.get("/healthz")
@operation("get", "/healthz", summary="Liveness", responses={200: schemas.Health})
def healthz() -> Response:
    """200 while the process serves."""
    return _json({"status": "ok"})


@bp.get("/readyz")
@operation("get", "/readyz", summary="Readiness",
           params=[query("workers", {"type": "boolean"}, "Also require a worker that proved it is consuming.")],
           responses={200: schemas.Readiness, 503: schemas.Readiness})
def readyz() -> Response:
    """Redis answers and the models are loaded; worker freshness is reported, and required with workers=true."""
    svc = services()
    need_workers = parse_bool("workers", request.args.get("workers"))
    checks: dict = {}
    ready = True
    beats: dict = {}
    try:
        svc.redis.ping()
        beats = svc.redis.hgetall(keys.WORKERS)
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
    ready &= checks["models"]["ok"]
    now = time.time()
    fresh_within = 3 * svc.settings.HEARTBEAT_INTERVAL
    ages = {k.decode(): round(now - float(v), 1) for k, v in beats.items()}
    fresh = {k: a for k, a in ages.items() if a <= fresh_within}
    checks["workers"] = {"ok": bool(fresh), "fresh": len(fresh), "heartbeat_age_seconds": ages,
                         "required": need_workers}
    if need_workers:
        ready &= bool(fresh)
    return _json({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)
