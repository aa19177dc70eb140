"""The error hierarchy: each class carries its HTTP status and stable code; rendered once, in api/errors.py."""
from __future__ import annotations


class PredqError(Exception):
    """Base of every error a client may see."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}

    def to_dict(self) -> dict:
        body: dict = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class MalformedJson(PredqError):
    status, code = 400, "malformed_json"


class BadRequest(PredqError):
    """A body the MLflow or Open Inference Protocol routes refuse as a whole (400; their own error bodies)."""

    status, code = 400, "bad_request"


class InvalidParameter(PredqError):
    status, code = 400, "invalid_parameter"


class InvalidParameterValue(PredqError):
    """A well-formed option that does not fit the data (e.g. an absent id_column)."""

    status, code = 422, "invalid_parameter"


class Unauthorized(PredqError):
    """No API key, or one the service does not know (always with WWW-Authenticate: Bearer)."""

    status, code = 401, "unauthorized"


class Forbidden(PredqError):
    """A known API key without the scope the route needs."""

    status, code = 403, "forbidden"


class AuthNotConfigured(Forbidden):
    """A request that reached a non-loopback address of a service with no API keys and AUTH not off."""

    code = "auth_not_configured"


class RateLimited(PredqError):
    status, code = 429, "rate_limited"


class NotFound(PredqError):
    status, code = 404, "not_found"


class ModelNotFound(PredqError):
    status, code = 404, "model_not_found"


class JobModelNotFound(ModelNotFound):
    """An unknown model named in a job request: the request body is invalid, not the URL."""

    status = 422


class JobNotFound(PredqError):
    status, code = 404, "job_not_found"


class MethodNotAllowed(PredqError):
    status, code = 405, "method_not_allowed"


class JobNotFinished(PredqError):
    status, code = 409, "job_not_finished"


class JobFinished(PredqError):
    status, code = 409, "job_finished"


class JobRunning(PredqError):
    status, code = 409, "job_running"


class TooLarge(PredqError):
    status, code = 413, "too_large"


class TooManyRows(PredqError):
    status, code = 413, "too_many_rows"


class UnsupportedMediaType(PredqError):
    status, code = 415, "unsupported_media_type"


class UnsupportedFormat(PredqError):
    status, code = 415, "unsupported_format"


class InvalidInput(PredqError):
    status, code = 422, "invalid_input"


class EmptyInput(PredqError):
    status, code = 422, "empty_input"


class MissingColumns(PredqError):
    status, code = 422, "missing_columns"


class InvalidFile(PredqError):
    status, code = 422, "invalid_file"


class InternalError(PredqError):
    status, code = 500, "internal_error"


class NotReady(PredqError):
    status, code = 503, "not_ready"


class ChunkStoreUnavailable(PredqError):
    """The object store named by CHUNK_STORE_URL failed (unreachable, refused, missing bucket): worth a retry."""

    status, code = 503, "chunk_store_unavailable"

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("headers", {"Retry-After": "30"})
        super().__init__(message, **kwargs)
