"""Single predictions served straight from the WSGI environ: `POST /v1/models/<name>/predict` with one JSON object.

Most of the time of a single prediction went to Flask's request handling (contexts, routing, hooks, Response
objects), not to the model. `FastPredict` sits in front of the Flask app and answers the common case itself, with
the same code as the Flask route for each step: the key check (`Gate`), the prediction (`score_record`), the
bodies of answers and errors, the response headers, the error logs and the request metrics.

It takes a request whose line and headers are of that kind: method POST, a plain model name, a JSON content type,
no Content-Encoding, a Content-Length within the limits, a plain query string. Anything else goes to Flask as it
came. As in Flask, the key comes first: a request without a valid key (or off loopback without keys) is refused
before its body is read. Then a body that does not parse to an object, an option that does not parse or a model
that does not exist sends the request to Flask, with the body it read put back. Nothing has changed state until
then; the key's rate-limit hit comes next, and from there on the fast path answers errors itself, as Flask would.
"""
from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from api.auth import Gate
from api.errors import INTERNAL_ERROR, error_payload, log_unhandled, request_fields
from api.metrics import RequestMetrics
from api.models import PREDICT_RULE, Serving, answered, score_record
from api.parsing import parse_bool
from shared.batching import Arrival
from shared.errors import PredqError
from shared.registry import ModelVersion, Registry

_PATH = re.compile(r"/v1/models/([A-Za-z0-9_.-]+)/predict")
#: A query string that needs no decoding: what parse_qsl makes of it, werkzeug makes too.
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9_.=&-]*")
_DIGITS = re.compile(r"[0-9]{1,20}")
_JSON = "application/json"

StartResponse = Callable[..., Any]


@dataclass
class _Request:
    """What a request that the fast path takes says: the model, the options and the object to predict."""

    path: str
    name: str
    mv: ModelVersion
    probabilities: bool
    record: dict


def status_line(status: int) -> str:
    """The status line werkzeug's responses give, e.g. "422 UNPROCESSABLE ENTITY"."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"


class FastPredict:
    """WSGI middleware: single predictions of one JSON object, answered without Flask; the rest, by `wsgi_app`."""

    def __init__(self, app: Flask, wsgi_app: Callable[[dict, StartResponse], Iterable[bytes]]):
        self.wsgi_app = wsgi_app
        svc = app.extensions["predq"]
        self.registry: Registry = svc.registry
        self.gate: Gate = app.extensions["predq.auth"]
        self.metrics: RequestMetrics = app.extensions["predq.metrics"]
        self.serving: Serving = app.extensions["predq.serving"]
        self.max_bytes = min(svc.settings.MAX_JSON_BYTES, svc.settings.MAX_UPLOAD_BYTES)  # past either: Flask's 413

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not self._takes(environ):
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        try:
            found = self.gate.identify(environ, "POST", environ["PATH_INFO"], PREDICT_RULE)
        except PredqError as e:
            return self._error(environ, start_response, started, e)
        with self.serving.batcher.arrival() as arrival:
            request = self._read(environ)
            if request is not None:
                status, body, headers = self._answer(request, found, arrival)
        if request is None:
            return self.wsgi_app(environ, start_response)
        return self._respond(environ, start_response, started, status, body, headers)

    def _takes(self, environ: dict[str, Any]) -> bool:
        """Whether the request's line and headers are of the kind served here (its body is read later)."""
        content_type = environ.get("CONTENT_TYPE", "")
        length = environ.get("CONTENT_LENGTH", "")
        return (environ["REQUEST_METHOD"] == "POST"
                and _PATH.fullmatch(environ.get("PATH_INFO", "")) is not None
                and (content_type == _JSON or content_type.startswith(_JSON + ";"))
                and "HTTP_CONTENT_ENCODING" not in environ and "HTTP_TRANSFER_ENCODING" not in environ
                and _DIGITS.fullmatch(length) is not None and int(length) <= self.max_bytes
                and _PLAIN_QUERY.fullmatch(environ.get("QUERY_STRING", "")) is not None)

    def _read(self, environ: dict[str, Any]) -> _Request | None:
        """The request's options, object and model; None (with the body put back) when Flask is to answer it."""
        length = int(environ["CONTENT_LENGTH"])
        data = environ["wsgi.input"].read(length) if length else b""
        try:
            args: dict[str, str] = {}
            for key, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True):
                args.setdefault(key, value)  # the first value, as Flask's request.args.get gives
            probabilities = parse_bool("probabilities", args.get("probabilities"))
            record = orjson.loads(data) if len(data) == length else None
            if isinstance(record, dict):
                path = environ["PATH_INFO"]
                name = path.split("/")[3]
                return _Request(path, name, self.registry.get(name, args.get("version") or None), probabilities,
                                record)
        except Exception:  # noqa: BLE001 - nothing has changed yet: Flask answers it, its own way
            pass
        environ["wsgi.input"] = io.BytesIO(data)
        return None

    def _answer(self, request: _Request, found: tuple, arrival: Arrival) -> tuple[int, bytes, Iterable]:
        """Status, body and own headers of the answer: the prediction, or the error Flask's handlers would give."""
        try:
            self.gate.admit(*found, "POST", PREDICT_RULE)
            prediction, probas = score_record(self.serving, request.mv, request.record, request.probabilities,
                                              arrival)
            return 200, orjson.dumps(answered(self.metrics, request.mv, prediction, probas)), ()
        except PredqError as e:
            return *error_payload(e.status, e.code, e.message, e.details), e.headers.items()
        except Exception:  # noqa: BLE001 - as Flask's last error handler: logged, and a 500 with the contract's body
            log_unhandled("POST", request.path, request_fields("POST", PREDICT_RULE, request.path,
                                                               {"name": request.name}))
            return *error_payload(*INTERNAL_ERROR), ()

    def _error(self, environ: dict[str, Any], start_response: StartResponse, started: float,
               e: PredqError) -> Iterable[bytes]:
        """The answer to a refusal that came before the body was read."""
        status, body = error_payload(e.status, e.code, e.message, e.details)
        return self._respond(environ, start_response, started, status, body, e.headers.items())

    def _respond(self, environ: dict[str, Any], start_response: StartResponse, started: float, status: int,
                 body: bytes, headers: Iterable[tuple[str, str]]) -> Iterable[bytes]:
        """Send the answer with the headers Flask's would have, and observe it as Flask's route would be."""
        self.metrics.observe_request(PREDICT_RULE, "POST", status, time.perf_counter() - started)
        start_response(status_line(status), [
            ("Content-Type", _JSON), ("Content-Length", str(len(body))), *headers,
            *self.gate.response_headers(environ.get("HTTP_ORIGIN"))])
        return [body]
