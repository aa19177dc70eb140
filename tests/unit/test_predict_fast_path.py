"""The fast path of single predictions answers exactly as the Flask route does, and answers without Flask."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
from flask import Flask, request_started

from api import create_app
from shared.auth import new_key
from shared.ratelimit import RateLimiter, counter_key
from tests.support.models import SENTINEL, fussy_classifier, fussy_regressor, install

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there; no route asked here needs Redis
KEYS = {name: new_key(name, scopes) for name, scopes in {
    "alice": ["predict", "jobs"], "jobber": ["jobs"], "ops": ["admin"], "limited": ["predict"]}.items()}
ROW = {"f0": 0.5, "f1": -1.0, "f2": 0.25, "f3": 2.0, "f4": -0.5}
MAX_JSON_BYTES = 4096
NOW = 1000.0  # the rate limiter's clock: Retry-After is the same in both apps
LIMIT = 1000
AUTHORIZATION = {"alice": f"Bearer {KEYS['alice'][0]}", "jobber": f"Bearer {KEYS['jobber'][0]}",
                 "ops": f"Bearer {KEYS['ops'][0]}", "limited": f"Bearer {KEYS['limited'][0]}",
                 "unknown": "Bearer pq_not-a-key", "basic": "Basic YWxpY2U6c2VjcmV0", None: None}
VALID_KEYS = {"alice", "jobber", "ops", "limited"}


@dataclass(frozen=True)
class Case:
    """One request. `shape`: its line and headers are of the kind the fast path takes; `good`: so are its
    options, body and model (the fast path answers it once the key is known)."""

    name: str
    url: str = "/v1/models/clf/predict"
    method: str = "POST"
    body: Any = field(default_factory=lambda: ROW)
    data: bytes | None = None  # sent as is, instead of `body` as JSON
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    key: str | None = "alice"
    shape: bool = True
    good: bool = True

    def payload(self) -> bytes:
        return self.data if self.data is not None else orjson.dumps(self.body)


def _padded(size: int) -> dict:
    row = dict(ROW, note="")
    return dict(row, note="x" * (size - len(orjson.dumps(row))))


CASES = [
    Case("one object"),
    Case("probabilities", "/v1/models/clf/predict?probabilities=true"),
    Case("probabilities=1 and an unknown option", "/v1/models/clf/predict?probabilities=1&x=y"),
    Case("a repeated option: the first counts", "/v1/models/clf/predict?probabilities=true&probabilities=maybe"),
    Case("an older version", "/v1/models/clf/predict?version=v1&probabilities=true"),
    Case("an empty version", "/v1/models/clf/predict?version="),
    Case("regressor, probabilities asked", "/v1/models/reg/predict?probabilities=true"),
    Case("charset parameter", content_type="application/json; charset=utf-8"),
    Case("unknown fields ignored", body=dict(ROW, extra="x", more=[1, 2])),
    Case("wrong type", body=dict(ROW, f0="abc")),
    Case("boolean value", body=dict(ROW, f1=True)),
    Case("missing feature", body={k: v for k, v in ROW.items() if k != "f4"}),
    Case("null feature", body=dict(ROW, f3=None)),
    Case("empty object", body={}),
    Case("the model raises on the row", body=dict(ROW, f2=SENTINEL)),
    Case("the model raises on a regressor's row", "/v1/models/reg/predict", body=dict(ROW, f0=SENTINEL)),
    Case("between the two size limits", body=_padded(3500)),
    Case("at the JSON limit", body=_padded(MAX_JSON_BYTES)),
    # handed to Flask after the key check: options, body or model are not the fast path's to answer
    Case("unknown model", "/v1/models/nope/predict", good=False),
    Case("unknown version", "/v1/models/clf/predict?version=v9", good=False),
    Case("bad probabilities", "/v1/models/clf/predict?probabilities=maybe", good=False),
    Case("malformed JSON", data=b'{"f0": ', good=False),

    Case("array of rows", body=[ROW, dict(ROW, f0="abc"), 7], good=False),
    Case("empty array", body=[], good=False),
    Case("a number", body=3, good=False),
    Case("a string", body="row", good=False),
    Case("null", body=None, good=False),
    # handed to Flask at once: not of the fast path's kind
    Case("past the JSON limit", body=_padded(MAX_JSON_BYTES + 1), shape=False),
    Case("empty body, no Content-Length", data=b"", shape=False),
    Case("text/plain", content_type="text/plain", shape=False),
    Case("no content type", content_type=None, shape=False),
    Case("a +json content type", content_type="application/vnd.predq+json", shape=False),
    Case("gzip", headers=(("Content-Encoding", "gzip"),), shape=False),
    Case("identity encoding", headers=(("Content-Encoding", "identity"),), shape=False),
    Case("percent-encoded option", "/v1/models/clf/predict?probabilities=%74rue", shape=False),
    Case("a percent-encoded model name (the server decodes it)", "/v1/models/cl%66/predict"),
    Case("a model name that is not ASCII", "/v1/models/caf%C3%A9/predict", shape=False),
    Case("a trailing slash", "/v1/models/clf/predict/", shape=False),
    Case("query parameters", "/v1/models/clf/predict?f0=1&f1=2&f2=3&f3=4&f4=5", method="GET", content_type=None,
         data=b"", shape=False),
    Case("PUT", method="PUT", shape=False),
    Case("a model list", "/v1/models", method="GET", content_type=None, data=b"", shape=False),
    # keys and origins
    Case("no key", key=None),
    Case("unknown key", key="unknown"),
    Case("another scheme", key="basic"),
    Case("key without the predict scope", key="jobber"),
    Case("admin key", key="ops"),
    Case("rate limited key", key="limited"),
    Case("no key and not JSON", key=None, content_type="text/plain", shape=False),
    Case("no key and an unknown model", "/v1/models/nope/predict", key=None, good=False),
    Case("limited key and an unknown model", "/v1/models/nope/predict", key="limited", good=False),
    Case("listed origin", headers=(("Origin", "https://app.example.com"),)),
    Case("listed origin, refused", headers=(("Origin", "https://app.example.com"),), key="unknown"),
    Case("listed origin, error", body=dict(ROW, f0="abc"), headers=(("Origin", "https://app.example.com"),)),
    Case("other origin", headers=(("Origin", "https://evil.example"),)),
    Case("preflight", method="OPTIONS", content_type=None, data=b"", key=None, shape=False,
         headers=(("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "POST"))),
]


@dataclass(frozen=True)
class Config:
    """An app's settings and where its requests arrive; `refuses(case)`: its key check refuses the case."""

    name: str
    settings: dict
    base_url: str = "http://localhost"

    @property
    def keys(self) -> bool:
        return "API_KEYS_FILE" in self.settings

    def refuses(self, case: Case) -> bool:
        if self.keys:
            return case.key not in VALID_KEYS
        return self.settings.get("AUTH") != "off" and "localhost" not in self.base_url

    def max_bytes(self) -> int:
        return min(MAX_JSON_BYTES, self.settings.get("MAX_UPLOAD_BYTES", MAX_JSON_BYTES))

    def fast(self, case: Case) -> bool:
        """Whether the fast path answers the case itself."""
        if not case.shape or len(case.payload()) > self.max_bytes():
            return False
        return self.refuses(case) or case.good


def configs(keys_file: str) -> list[Config]:
    return [
        Config("no keys, loopback", {}),
        Config("no keys, another address", {}, base_url="http://predq.example"),
        Config("AUTH=off, another address", {"AUTH": "off"}, base_url="http://predq.example"),
        Config("keys, CORS, uploads smaller than JSON", {
            "API_KEYS_FILE": keys_file, "CORS_ORIGINS": "https://app.example.com", "MAX_UPLOAD_BYTES": 3000}),
        Config("keys, CORS *", {"API_KEYS_FILE": keys_file, "CORS_ORIGINS": "*"}),
    ]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    install(root, "clf", fussy_classifier(), "v1")
    install(root, "clf", fussy_classifier(), "v2")
    install(root, "reg", fussy_regressor())
    return root


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"keys": [entry for _, entry in KEYS.values()]}))
    return str(path)


def make_app(models_dir: Path, settings: dict, fast: bool) -> Flask:
    app = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": str(models_dir), "MODEL_RESCAN_SECONDS": 0,
                      "RATE_LIMIT_PER_MINUTE": 0, "MAX_JSON_BYTES": MAX_JSON_BYTES,
                      "PREDICT_FAST_PATH": "on" if fast else "off", **settings})
    gate = app.extensions["predq.auth"]
    if gate.ring is not None:
        client = fakeredis.FakeRedis()
        client.set(counter_key("limited", int(NOW // 60)), LIMIT)  # this key has used up its minute
        gate.limiter = RateLimiter(client, LIMIT, clock=lambda: NOW)
    return app


@contextmanager
def flask_requests(app: Flask) -> Iterator[list[str]]:
    """The paths of the requests Flask handled (pushed a request context for) inside the block."""
    seen: list[str] = []

    def record(sender, **_: Any) -> None:
        from flask import request
        seen.append(request.path)

    with request_started.connected_to(record, app):
        yield seen


def send(app: Flask, config: Config, case: Case):
    headers = list(case.headers)
    if AUTHORIZATION[case.key] is not None:
        headers.append(("Authorization", AUTHORIZATION[case.key]))
    return app.test_client().open(case.url, method=case.method, data=case.payload(), content_type=case.content_type,
                                  headers=headers, base_url=config.base_url)


def answer(response) -> tuple:
    headers = [(k, v) for k, v in response.headers.items() if k not in ("Date", "Server")]
    return response.status, headers, response.get_data()


def counts(app: Flask) -> dict:
    """Requests by route, method and status, and predictions by model, as /metrics shows them."""
    out = {}
    for family in app.extensions["predq.metrics"].collect():
        for sample in family.samples:
            if sample.name.endswith("_count") or sample.name == "predq_predictions_total":
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_the_matrix_is_answered_alike_with_and_without_the_fast_path(models_dir, keys_file):
    """Every case, in every configuration: the same status line, headers (in order) and body either way, the same
    metrics; and the fast path answers exactly the cases it is meant to, without Flask."""
    for config in configs(keys_file):
        fast_app, flask_app = (make_app(models_dir, config.settings, fast) for fast in (True, False))
        for case in CASES:
            with flask_requests(fast_app) as seen:
                fast = answer(send(fast_app, config, case))
            slow = answer(send(flask_app, config, case))
            assert fast == slow, (config.name, case.name)
            assert (not seen) == config.fast(case), (config.name, case.name, fast[0])
        assert counts(fast_app) == counts(flask_app), config.name


def test_the_matrix_covers_each_answer_of_the_fast_path(models_dir, keys_file):
    """The cases the fast path answers include successes and each kind of error: the matrix is not vacuous."""
    seen = set()
    for config in configs(keys_file):
        app = make_app(models_dir, config.settings, True)
        for case in CASES:
            if config.fast(case):
                response = send(app, config, case)
                seen.add((response.status_code, (response.json.get("error") or {}).get("code")))
    assert {(200, None), (422, "invalid_input"), (422, "prediction_failed"), (401, "unauthorized"),
            (403, "forbidden"), (403, "auth_not_configured"), (429, "rate_limited")} <= seen


def test_a_fast_answer_has_the_headers_of_the_contract(models_dir, keys_file):
    """Checked directly too: security headers, WWW-Authenticate, Retry-After and CORS on fast-path answers."""
    config = configs(keys_file)[3]
    app = make_app(models_dir, config.settings, True)
    origin = (("Origin", "https://app.example.com"),)
    with flask_requests(app) as seen:
        ok = send(app, config, Case("ok", headers=origin))
        no_key = send(app, config, Case("no key", key=None))
        limited = send(app, config, Case("limited", key="limited"))
    assert not seen
    assert ok.status_code == 200 and ok.json["model"] == {"name": "clf", "version": "v2"}
    assert ok.headers["X-Content-Type-Options"] == "nosniff" and ok.headers["Cache-Control"] == "no-store"
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com" and ok.headers["Vary"] == "Origin"
    assert no_key.headers["WWW-Authenticate"] == 'Bearer realm="predq"'
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


def test_an_unforeseen_error_is_logged_and_answered_alike(models_dir, monkeypatch, caplog):
    """A failure nobody foresaw: the same 500 body and the same log line (route, model, traceback) either way."""
    import api.models

    def broken(mv):
        raise RuntimeError("broken plan")

    apps = {fast: make_app(models_dir, {}, fast) for fast in (True, False)}
    monkeypatch.setattr(api.models, "record_plan", broken)
    logged = []
    for fast, app in apps.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="api.errors"), flask_requests(app) as seen:
            response = send(app, Config("loopback", {}), Case("one"))
        assert (not seen) == fast
        assert response.status_code == 500 and response.json["error"]["code"] == "internal_error"
        [record] = caplog.records
        logged.append((record.getMessage(), record.route, record.model, record.path, record.exc_info[0],
                       response.get_data()))
    assert logged[0] == logged[1]


def test_an_unknown_key_is_logged_once(models_dir, keys_file, caplog):
    """The fast path refuses an unknown key itself: one log line, as on the Flask path."""
    config = configs(keys_file)[3]
    for fast in (True, False):
        app = make_app(models_dir, config.settings, fast)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="api.auth"):
            assert send(app, config, Case("unknown", key="unknown")).status_code == 401
        assert [r.getMessage() for r in caplog.records] == ["request refused: unknown API key"]


def test_metrics_show_fast_path_requests(models_dir):
    """/metrics counts fast-path requests under the route's rule, and their predictions."""
    app = make_app(models_dir, {}, True)
    for case in (Case("ok"), Case("ok"), Case("bad", body=dict(ROW, f0="abc"))):
        send(app, Config("loopback", {}), case)
    page = app.test_client().get("/metrics").get_data(as_text=True)
    series = 'predq_http_request_duration_seconds_count{method="POST",route="/v1/models/<name>/predict",status='
    assert series + '"200"} 2.0' in page and series + '"422"} 1.0' in page
    assert 'predq_predictions_total{model="clf",version="v2"} 2.0' in page


def test_the_setting_turns_the_fast_path_off(models_dir):
    """PREDICT_FAST_PATH=off: every prediction goes through Flask."""
    app = make_app(models_dir, {}, False)
    with flask_requests(app) as seen:
        assert send(app, Config("loopback", {}), Case("ok")).status_code == 200
    assert seen == ["/v1/models/clf/predict"]
