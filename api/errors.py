"""The one error handler: every error becomes the contract's JSON body, never a stack trace or HTML.

The routes of other protocols (MLflow's scoring server, the Open Inference Protocol) answer with their own error
bodies, chosen here by path.
"""
from __future__ import annotations

import logging

import orjson
import redis
from flask import Flask, Response, current_app, has_request_context, request
from werkzeug.exceptions import HTTPException

from shared.errors import PredqError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    411: "length_required", 413: "too_large", 415: "unsupported_media_type", 429: "rate_limited",
}


#: MLflow's error codes by HTTP status (mlflow.exceptions ERROR_CODE_TO_HTTP_STATUS, read backwards).
_MLFLOW_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST",
                 429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR", 503: "TEMPORARILY_UNAVAILABLE"}
MLFLOW_PATHS = frozenset({"/invocations", "/ping", "/health", "/version"})


def protocol(path: str) -> str:
    """Whose error body a path answers with: "mlflow" (scoring server), "oip" (Inference Protocol v2) or "predq"."""
    if path in MLFLOW_PATHS:
        return "mlflow"
    if path == "/v2" or path.startswith("/v2/"):
        return "oip"
    return "predq"


def error_payload(status: int, code: str, message: str, details: dict | None = None,
                  kind: str = "predq") -> tuple[int, bytes]:
    """The status and JSON body of an error in a protocol's own form (see `protocol`).

    MLflow and the Open Inference Protocol refuse a request as a whole, with 400 where predq says 422 (input
    that cannot be predicted).
    """
    if kind == "predq":
        body: dict = {"code": code, "message": message}
        if details:
            body["details"] = details
        return status, orjson.dumps({"error": body})
    if status == 422:
        status = 400
    if kind == "oip":
        return status, orjson.dumps({"error": message})
    mlflow_code = "INVALID_PARAMETER_VALUE" if code == "invalid_parameter" else _MLFLOW_CODES.get(status, "BAD_REQUEST")
    return status, orjson.dumps({"error_code": mlflow_code, "message": message})


#: The answer to an error nobody foresaw (after `log_unhandled`): status, code, message.
INTERNAL_ERROR = (500, "internal_error", "The service failed to handle this request; it has been logged.")


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   headers: dict | None = None) -> Response:
    """An error in the protocol of the current route (predq's outside a request)."""
    kind = protocol(request.path) if has_request_context() else "predq"
    status, body = error_payload(status, code, message, details, kind)
    response = Response(body, status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def request_fields(method: str, rule: str | None, path: str, view_args: dict) -> dict:
    """What a log line about a failed request says about it: method, route, path, and the job or model it named."""
    fields = {"method": method, "route": rule, "path": path}
    if "job_id" in view_args:
        fields["job_id"] = view_args["job_id"]
    if "name" in view_args and rule is not None and "/models/<name>" in rule:
        fields["model"] = view_args["name"]
    return fields


def _request_fields() -> dict:
    rule = request.url_rule
    return request_fields(request.method, rule.rule if rule is not None else None, request.path,
                          request.view_args or {})


def log_unhandled(method: str, path: str, fields: dict) -> None:
    """Log the exception being handled, which no handler foresaw, with the request's fields."""
    log.exception("unhandled error on %s %s", method, path, extra=fields)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(PredqError)
    def _predq(e: PredqError) -> Response:
        return error_response(e.status, e.code, e.message, e.details, e.headers)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Response:
        status = e.code or 500
        if status == 404:
            message = f"No route {request.path}; see GET /openapi.json for the routes."
        elif status == 405:
            allowed = ", ".join(e.valid_methods or []) if hasattr(e, "valid_methods") else ""
            message = f"{request.method} is not allowed on {request.path}" + (f"; use {allowed}." if allowed else ".")
        elif status == 413:
            limit = current_app.extensions["predq"].settings.MAX_UPLOAD_BYTES
            return error_response(413, "too_large", f"The request body is larger than the {limit} bytes accepted "
                                  "(MAX_UPLOAD_BYTES).", {"limit": "MAX_UPLOAD_BYTES", "max": limit})
        else:
            message = e.description or e.name
        return error_response(status, _HTTP_CODES.get(status, "http_error"), message)

    @app.errorhandler(redis.OutOfMemoryError)
    def _store_full(e: redis.OutOfMemoryError) -> Response:
        log.error("Redis refused a write: out of memory", extra=_request_fields())
        return error_response(503, "store_full", "The job store is full; retry later.", headers={"Retry-After": "30"})

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def _store_down(e: redis.RedisError) -> Response:
        log.error("Redis unavailable: %s", type(e).__name__, extra=_request_fields())
        return error_response(503, "not_ready", "The job store is not reachable; retry shortly.",
                              headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log_unhandled(request.method, request.path, _request_fields())
        return error_response(*INTERNAL_ERROR)
