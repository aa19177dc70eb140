"""The OpenAPI 3.1 document, built from the schemas the views validate with and the operations they declare."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from flask import Blueprint, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import schemas
from api.auth import required_scope
from api.errors import protocol

bp = Blueprint("openapi", __name__)

_OPERATIONS: list[dict[str, Any]] = []
_STATUS_TEXT = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Malformed request", 401: "Unauthorized",
                403: "Forbidden", 404: "Not found", 405: "Method not allowed", 409: "Conflict", 413: "Too large",
                415: "Unsupported media type", 422: "Invalid input", 429: "Rate limited", 503: "Not ready"}

_BEARER = {
    "type": "http", "scheme": "bearer",
    "description": "An API key the operator issued (API_KEYS_FILE), sent as 'Authorization: Bearer <key>'. Its "
                   "scopes are 'predict' (models and predictions), 'jobs' (its own batch jobs) and 'admin' (every "
                   "job, schedules, metrics; includes the other two). A service without keys configured needs none: "
                   "it then answers only on a loopback address, or anywhere with AUTH=off.",
}


#: The error body of each protocol's routes (api.errors.protocol tells which a path speaks).
ERROR_SCHEMAS: dict[str, type[BaseModel]] = {"predq": schemas.Error, "mlflow": schemas.MlflowError,
                                             "oip": schemas.OipError}


#: What gunicorn answers itself, before any route (gunicorn.conf.py), so with predq's own error body on every route.
_SERVER_RESPONSES = {
    "414": {"description": "URI too long: the request line (method, path and query) is longer than the server "
                           "accepts (code uri_too_long), answered before the route.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
}


def _auth_responses(scope: str, error_model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """What every route behind a key may answer besides its own responses."""
    error = {"application/json": {"schema": _ref(error_model)}}
    return {
        "401": {"description": "Unauthorized: no API key, or one the service does not know (code unauthorized).",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
                "content": error},
        "403": {"description": f"Forbidden: the API key lacks the '{scope}' scope (code forbidden, details."
                             "required_scope), or the service has no keys and the request did not come to a "
                             "loopback address (code auth_not_configured).", "content": error},
        "429": {"description": "Rate limited: this key made more than RATE_LIMIT_PER_MINUTE requests in the last "
                               "minute (code rate_limited).",
                "headers": {"Retry-After": {"schema": {"type": "integer"},
                                            "description": "Seconds until a request will be accepted again."}},
                "content": error},
    }


def operation(method: str, path: str, *, summary: str, responses: dict[int, type[BaseModel] | str | None],
              body: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None) -> Callable:
    """Declare a view's operation for the OpenAPI document (path in OpenAPI's `{name}` form)."""
    def wrap(view: Callable) -> Callable:
        _OPERATIONS.append({"method": method.lower(), "path": path, "summary": summary, "responses": responses,
                            "body": body, "params": params or [], "doc": (view.__doc__ or "").strip()})
        return view
    return wrap


def query(name: str, schema: dict[str, Any], description: str = "", required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _content(spec: Any) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    return {"application/json": {"schema": _ref(spec)}}


def build() -> dict[str, Any]:
    models = set(ERROR_SCHEMAS.values())
    for op in _OPERATIONS:
        models.update(m for m in op["responses"].values() if isinstance(m, type))
        for media in (op["body"] or {}).values():
            if isinstance(media.get("model"), type):
                models.add(media["model"])
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in _OPERATIONS:
        error_model = ERROR_SCHEMAS[protocol(op["path"])]
        responses = {}
        for status, model in sorted(op["responses"].items()):
            entry: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "Response")}
            if isinstance(model, type):
                entry["content"] = _content(model)
            elif isinstance(model, str):
                entry["content"] = {model: {"schema": {"type": "string"}}}
            if status >= 400:
                entry = {"description": _STATUS_TEXT.get(status, "Error"), "content": _content(error_model)}
            responses[str(status)] = entry
        responses.update(_SERVER_RESPONSES)
        scope = required_scope(op["path"])
        if scope is None:
            security: list[dict[str, list[str]]] = []
        else:
            security = [{"bearerAuth": [scope]}]
            for status, entry in _auth_responses(scope, error_model).items():
                if status == "403" and status in responses:  # the route's own 403 too (e.g. source_not_allowed)
                    entry = {**entry, "description": entry["description"] + " Or this route's own refusal."}
                responses[status] = entry
        responses = dict(sorted(responses.items()))
        item: dict[str, Any] = {"summary": op["summary"], "description": op["doc"], "responses": responses,
                                "security": security}
        if op["params"]:
            item["parameters"] = op["params"]
        if op["body"]:
            item["requestBody"] = {"required": True, "content": {
                media: ({"schema": _ref(spec["model"])} if isinstance(spec.get("model"), type) else {"schema": spec["schema"]})
                for media, spec in op["body"].items()}}
        paths.setdefault(op["path"], {})[op["method"]] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "predq", "version": "1", "description": "Predictions from scikit-learn models: "
                 "synchronous single rows and chunked batch jobs."},
        "paths": dict(sorted(paths.items())),
        "security": [{"bearerAuth": []}],
        "components": {"schemas": defs.get("$defs", {}), "securitySchemes": {"bearerAuth": _BEARER}},
    }


@bp.get("/openapi.json")
@operation("get", "/openapi.json", summary="This document", responses={200: "application/json"})
def openapi_json() -> Response:
    """The OpenAPI 3.1 description of every route; open to all, like the health routes (it holds no secret)."""
    return Response(orjson.dumps(build()), mimetype="application/json")
