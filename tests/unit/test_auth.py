"""API keys, scopes, rate limits, CORS and security headers, on the app in-process (no server, no Redis)."""
from __future__ import annotations

import hashlib
import json
import logging
import re

import fakeredis
import pytest
import redis

from api import create_app
from api.auth import OPEN_PATHS, ROUTE_SCOPES, SECURITY_HEADERS, arrived_on_loopback, required_scope
from cli.main import main as predq
from shared import auth
from shared.auth import ExposedWithoutKeys, KeyFileError, load_keys, new_key, startup_mode
from shared.idempotency import IdempotencyKeys
from shared.jobs import JobOptions, JobStore
from shared.ratelimit import RateLimiter, seconds_until_free

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there: routes that need Redis answer 503, quickly

KEYS = {name: new_key(name, scopes) for name, scopes in {
    "alice": ["predict", "jobs"], "predictor": ["predict"], "jobber": ["jobs"], "ops": ["admin"]}.items()}


def key_file(tmp_path, entries) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


@pytest.fixture
def keys_path(tmp_path) -> str:
    return key_file(tmp_path, [entry for _, entry in KEYS.values()])


@pytest.fixture
def make_app(tmp_path):
    def make(**config):
        return create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": str(tmp_path / "models"),
                           "RATE_LIMIT_PER_MINUTE": 0, **config})
    return make


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


# -- the key file ------------------------------------------------------------------------------------

def test_a_key_file_is_read_into_names_hashes_and_scopes(keys_path):
    """Each entry becomes a key with its name and scopes; the presented key is found by its sha256."""
    ring = load_keys(keys_path)
    assert len(ring) == 4
    found = ring.find(KEYS["alice"][0])
    assert found is not None and found.name == "alice" and found.scopes == {"predict", "jobs"}
    assert ring.find("pq_not-a-key") is None


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot be read"),
    ("{not json", "is not JSON"),
    ('["a"]', 'must be an object {"keys"'),
    ('{"keys": []}', "lists no keys"),
    ('{"keys": ["x"]}', "keys[0] is not an object"),
    ('{"keys": [{"name": "a b", "sha256": "' + "0" * 64 + '", "scopes": ["jobs"]}]}', "keys[0]: the name must"),
    ('{"keys": [{"name": "a", "sha256": "pq_the-key-itself", "scopes": ["jobs"]}]}', "not the key itself"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": []}]}', "non-empty list"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": ["root"]}]}', "unknown scope root"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": ["jobs"]}, '
     '{"name": "a", "sha256": "' + "1" * 64 + '", "scopes": ["jobs"]}]}', "the same name"),
])
def test_a_bad_key_file_is_a_clear_error_naming_the_file(tmp_path, content, message):
    """A missing, malformed or inconsistent file stops the start with a message naming the file and the flaw."""
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KeyFileError) as e:
        load_keys(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_the_app_refuses_to_start_with_a_bad_key_file(tmp_path, make_app):
    """create_app raises on a bad file, so a web process never serves with keys it could not read."""
    path = key_file(tmp_path, [{"name": "a", "sha256": "nope", "scopes": ["jobs"]}])
    with pytest.raises(KeyFileError, match="sha256"):
        make_app(API_KEYS_FILE=path)


def test_every_configured_hash_is_compared_whichever_key_matches(keys_path, monkeypatch):
    """The lookup compares with hmac.compare_digest against every key, with no early exit on a match."""
    ring = load_keys(keys_path)
    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in (ring.keys[0], ring.keys[-1]):
        calls.clear()
        key = next(k for k, e in KEYS.values() if e["name"] == presented.name)
        assert ring.find(key) is presented
        assert len(calls) == len(ring)
        assert all(a == hashlib.sha256(key.encode()).digest() for a, _ in calls)
    calls.clear()
    assert ring.find("pq_wrong") is None and len(calls) == len(ring)


def test_new_key_prints_the_key_once_and_its_file_entry(tmp_path, capsys):
    """`predq new-key` prints a random key and an entry holding only its sha256, which a key file accepts."""
    assert predq(["new-key", "team-a", "--scopes", "predict,jobs"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^  (pq_\S+)$", out, flags=re.M).group(1)
    entry = json.loads(re.search(r"^  (\{.*\})$", out, flags=re.M).group(1))
    assert entry == {"name": "team-a", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                     "scopes": ["predict", "jobs"]}
    assert out.count(key) == 1
    ring = load_keys(key_file(tmp_path, [entry]))
    assert ring.find(key).name == "team-a"
    assert predq(["new-key", "team-a", "--scopes", "root"]) == 2
    assert "unknown scope root" in capsys.readouterr().err


# -- serving without keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("bind", [("127.0.0.1", 8000), ("::1", 8000), ("localhost", 8000), "/run/predq.sock"])
def test_without_keys_a_loopback_or_unix_bind_starts(bind):
    """Loopback addresses (and unix sockets) serve without keys, and the start says so."""
    assert "loopback only" in startup_mode("on", None, [bind])


@pytest.mark.parametrize("binds", [[("0.0.0.0", 8000)], [("::", 8000)], [("127.0.0.1", 8000), ("192.0.2.7", 9)],
                                   [3]])
def test_without_keys_any_other_bind_is_refused(binds):
    """A bind other machines may reach (or an inherited fd, which cannot be told) refuses to start."""
    with pytest.raises(ExposedWithoutKeys, match="refusing to serve without API keys"):
        startup_mode("on", None, binds)


def test_auth_off_or_keys_serve_anywhere_and_say_which(keys_path):
    """AUTH=off serves without keys on any address; a key file is read (and counted) at start."""
    assert "AUTH=off" in startup_mode("off", None, [("0.0.0.0", 8000)])
    assert "4 keys" in startup_mode("on", keys_path, [("0.0.0.0", 8000)])
    with pytest.raises(KeyFileError):
        startup_mode("on", keys_path + ".missing", [("127.0.0.1", 8000)])


class FakeSocket:
    def __init__(self, local):
        self.local = local

    def getsockname(self):
        return self.local


@pytest.mark.parametrize(("environ", "loopback"), [
    ({"gunicorn.socket": FakeSocket(("127.0.0.1", 8000))}, True),
    ({"gunicorn.socket": FakeSocket(("::ffff:127.0.0.1", 8000, 0, 0))}, True),
    ({"gunicorn.socket": FakeSocket("/run/predq.sock")}, True),
    ({"gunicorn.socket": FakeSocket(("192.0.2.2", 8000))}, False),
    ({"werkzeug.socket": FakeSocket(("10.1.2.3", 8000))}, False),
    ({"SERVER_NAME": "localhost"}, True),
    ({"SERVER_NAME": "0.0.0.0"}, False),
    ({"SERVER_NAME": "api.example.com"}, False),
])
def test_the_address_a_request_arrived_on(environ, loopback):
    """The connection's local address decides; without a socket, the server's own name does."""
    assert arrived_on_loopback(environ) is loopback


def test_without_keys_a_request_to_another_address_is_refused(make_app):
    """No keys and AUTH on: a request that reached a non-loopback address gets 403; health still answers."""
    client = make_app().test_client()
    outside = {"werkzeug.socket": FakeSocket(("192.0.2.2", 8000))}
    response = client.get("/v1/models", environ_overrides=outside)
    assert response.status_code == 403 and response.json["error"]["code"] == "auth_not_configured"
    assert client.get("/healthz", environ_overrides=outside).status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert make_app(AUTH="off").test_client().get("/v1/models", environ_overrides=outside).status_code == 200


# -- scopes --------------------------------------------------------------------------------------------

def test_every_route_is_open_or_has_a_scope_of_its_own(make_app):
    """Each served route is a health route, the spec, or under a ROUTE_SCOPES prefix: none is admin by default."""
    app = make_app()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        listed = rule.rule in OPEN_PATHS or any(rule.rule == prefix or rule.rule.startswith(prefix + "/")
                                                for prefix, _ in ROUTE_SCOPES)
        assert listed, f"{rule.rule} has no line in api.auth.ROUTE_SCOPES"


ROUTES = [("GET", "/v1/models", "predict"), ("GET", "/v1/models/m", "predict"),
          ("POST", "/v1/models/m/predict", "predict"), ("GET", "/v1/models/m/predict", "predict"),
          ("GET", "/v1/jobs", "jobs"), ("POST", "/v1/jobs", "jobs"), ("GET", "/v1/jobs/job_x", "jobs"),
          ("GET", "/v1/jobs/job_x/results", "jobs"), ("GET", "/v1/jobs/job_x/errors", "jobs"),
          ("POST", "/v1/jobs/job_x/cancel", "jobs"), ("DELETE", "/v1/jobs/job_x", "jobs"),
          ("GET", "/v1/schedules", "admin"), ("POST", "/v1/schedules/s/run", "admin"), ("GET", "/metrics", "admin")]
SCOPES = {"alice": {"predict", "jobs"}, "predictor": {"predict"}, "jobber": {"jobs"},
          "ops": {"predict", "jobs", "admin"}}


@pytest.mark.parametrize(("method", "url", "scope"), ROUTES)
def test_scopes_matrix(make_app, keys_path, method, url, scope):
    """No key: 401; a key without the route's scope: 403 naming it; a key with it (or admin) gets through."""
    client = make_app(API_KEYS_FILE=keys_path).test_client()
    assert required_scope(re.sub(r"/(m|s|job_x)(?=/|$)", "/<x>", url)) == scope
    response = client.open(url, method=method)
    assert response.status_code == 401 and response.json["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for name, scopes in SCOPES.items():
        response = client.open(url, method=method, headers=bearer(name))
        if scope in scopes:
            assert response.status_code not in (401, 403), (name, response.json)
        else:
            assert response.status_code == 403, (name, response.json)
            assert response.json["error"]["code"] == "forbidden"
            assert response.json["error"]["details"] == {"required_scope": scope}
            assert f"'{scope}'" in response.json["error"]["message"]


def test_health_routes_and_the_spec_need_no_key_but_unknown_routes_do(make_app, keys_path):
    """The contract's health routes and /openapi.json are open; an unknown route needs a key before its 404."""
    client = make_app(API_KEYS_FILE=keys_path).test_client()
    for url in ("/healthz", "/readyz", "/openapi.json"):
        assert client.get(url).status_code in (200, 503), url
    assert client.get("/nowhere").status_code == 401
    assert client.get("/nowhere", headers=bearer("predictor")).status_code == 404
    assert client.put("/v1/jobs", headers=bearer("predictor")).status_code == 405
    assert set(OPEN_PATHS) >= {"/healthz", "/readyz", "/ping", "/health", "/version", "/v2/health/live",
                               "/v2/health/ready", "/openapi.json"}


def test_a_wrong_key_is_401_and_never_logged_or_echoed(make_app, keys_path, caplog):
    """A wrong key gets 401 invalid_token; neither it nor any real key appears in the log or the answer."""
    client = make_app(API_KEYS_FILE=keys_path).test_client()
    wrong = "pq_" + "W" * 43
    with caplog.at_level(logging.DEBUG):
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        client.get("/v1/models", headers=bearer("alice"))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert wrong not in response.get_data(as_text=True)
    assert "unknown API key" in caplog.text
    for secret in [wrong] + [k for k, _ in KEYS.values()]:
        assert secret not in caplog.text


def test_other_schemes_and_empty_bearers_are_missing_keys(make_app, keys_path):
    """Basic credentials or an empty Bearer are no key at all."""
    client = make_app(API_KEYS_FILE=keys_path).test_client()
    for header in ("Basic YTpi", "Bearer", "Bearer   ", KEYS["alice"][0]):
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"bearer  {KEYS['alice'][0]} "}).status_code == 200


# -- ownership ------------------------------------------------------------------------------------------

def test_idempotency_keys_are_scoped_per_owner():
    """Two API keys using the same Idempotency-Key each get their own claim; the same owner meets its own."""
    keys = IdempotencyKeys(fakeredis.FakeRedis(), lease_seconds=60, ttl=600)
    a, b, anonymous = keys.claim("k", "alice"), keys.claim("k", "bob"), keys.claim("k")
    assert a.acquired and b.acquired and anonymous.acquired
    assert len({a.redis_key, b.redis_key, anonymous.redis_key}) == 3
    keys.complete(a, "fp", "job_a")
    again = keys.claim("k", "alice")
    assert not again.acquired and again.job_id == "job_a"


def test_job_listing_filters_by_owner_and_bounds_its_scan():
    """A non-admin list sees its own jobs only; a scan cap ends a page early with a cursor that goes on."""
    store = JobStore(fakeredis.FakeRedis(), result_ttl=3600)

    def create(owner):
        return store.create(model="m", version="v1", sha256="s", options=JobOptions(), metadata={},
                            source_format="json", owner=owner)

    mine = [create("alice") for _ in range(3)]
    for _ in range(120):
        create("bob")
    create(None)
    assert [j.id for j in store.list(owner="alice", limit=10)[0]] == mine[::-1]
    assert len(store.list(limit=100)[0]) == 100
    assert store.get(mine[0]).owner == "alice"
    first, cursor = store.list(owner="alice", limit=10, max_scan=50)
    assert first == [] and cursor is not None
    rest, end = store.list(owner="alice", limit=10, cursor=cursor, max_scan=500)
    assert [j.id for j in rest] == mine[::-1] and end is None


# -- rate limits ----------------------------------------------------------------------------------------

class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_limit_holds_and_retry_after_is_when_a_request_fits_again():
    """Past the limit a key is refused; waiting Retry-After seconds lets it in, one second less does not."""
    clock = Clock(6000.0 + 10)  # 10 s into a window
    limiter = RateLimiter(fakeredis.FakeRedis(), 5, clock=clock)
    assert [limiter.hit("alice").allowed for _ in range(6)] == [True] * 5 + [False]
    refused = limiter.hit("alice")
    assert not refused.allowed and 1 <= refused.retry_after <= 120
    assert limiter.hit("bob").allowed  # each key has its own count
    start = clock.now
    clock.now = start + refused.retry_after - 1
    assert not limiter.hit("alice").allowed
    clock.now = start + refused.retry_after
    assert limiter.hit("alice").allowed


def test_the_window_slides_rather_than_resetting():
    """Just after a window turns, the last minute's requests still count (no double burst at the boundary)."""
    clock = Clock(6000.0 + 59)
    limiter = RateLimiter(fakeredis.FakeRedis(), 10, clock=clock)
    assert all(limiter.hit("k").allowed for _ in range(10))
    clock.now = 6060.0 + 1  # 1 s into the next window: 10 x 59/60 of the previous still count
    decision = limiter.hit("k")
    assert not decision.allowed
    assert decision.retry_after == 5  # 10 x (60 - t)/60 + 1 <= 10 from t = 6 s into the window on
    clock.now += 4
    assert not limiter.hit("k").allowed
    clock.now += 1
    assert limiter.hit("k").allowed


@pytest.mark.parametrize(("limit", "elapsed", "current", "previous"),
                         [(5, 10, 5, 0), (10, 1, 0, 10), (3, 30, 2, 4), (1, 0, 1, 0), (100, 59.5, 40, 200)])
def test_seconds_until_free_is_the_first_moment_a_request_fits(limit, elapsed, current, previous):
    """At the computed moment the weighted count leaves room for one request; a moment earlier it did not."""
    window = 60.0
    wait = seconds_until_free(limit, window, elapsed, current, previous)

    def fits(t):
        if elapsed + t < window:
            return previous * (window - elapsed - t) / window + current + 1 <= limit + 1e-9
        into = elapsed + t - window
        return current * (window - into) / window + 1 <= limit + 1e-9

    assert fits(wait) and (wait == 0 or not fits(wait - 0.01))


def test_a_limit_of_zero_is_no_limit():
    """RATE_LIMIT_PER_MINUTE=0 turns the limiter off (Redis is not even asked)."""
    limiter = RateLimiter(redis.Redis.from_url(DEAD_REDIS), 0)
    assert all(limiter.hit("k").allowed for _ in range(100))


def test_the_limiter_fails_open_and_says_so_once(caplog):
    """With Redis down, requests go through; the log says so once, not once per request."""
    clock = Clock(1000.0)
    limiter = RateLimiter(redis.Redis.from_url(DEAD_REDIS, socket_connect_timeout=1), 5, clock=clock,
                          pause_after_error=5)
    with caplog.at_level(logging.INFO, logger="shared.ratelimit"):
        for step in range(20):
            clock.now = 1000.0 + step  # past the pause too, so Redis is tried again
            assert limiter.hit("k").allowed
    assert caplog.text.count("Redis does not answer") == 1


def test_429_with_retry_after_through_the_app(make_app, keys_path):
    """Past the limit the app answers 429 rate_limited with Retry-After; health routes are never limited."""
    app = make_app(API_KEYS_FILE=keys_path)
    gate = app.extensions["predq.auth"]
    gate.limiter = RateLimiter(fakeredis.FakeRedis(), 3)
    client = app.test_client()
    statuses = [client.get("/v1/models", headers=bearer("alice")).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    response = client.get("/v1/models", headers=bearer("alice"))
    assert response.json["error"]["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    assert all(client.get("/healthz").status_code == 200 for _ in range(5))
    assert client.get("/v1/models", headers=bearer("predictor")).status_code == 200


# -- headers and CORS -------------------------------------------------------------------------------------

def test_security_headers_on_every_answer(make_app, keys_path):
    """Successes and errors alike carry nosniff, DENY, no-referrer, no-store and a CSP that allows nothing."""
    client = make_app(API_KEYS_FILE=keys_path).test_client()
    for response in (client.get("/healthz"), client.get("/v1/models"), client.get("/nowhere", headers=bearer("ops")),
                     client.get("/v1/models", headers=bearer("alice")), client.get("/openapi.json")):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.request.path, name)
        assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_answers_listed_origins_only(make_app, keys_path):
    """With CORS_ORIGINS, a listed origin's preflight gets 204 and the allow headers; another origin gets none."""
    client = make_app(API_KEYS_FILE=keys_path, CORS_ORIGINS="https://app.example.com, https://b.example").test_client()
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    response = client.options("/v1/jobs", headers=preflight)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    answer = client.get("/v1/models", headers={"Origin": "https://app.example.com", **bearer("alice")})
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Origin" in answer.headers["Vary"]
    other = client.options("/v1/jobs", headers={**preflight, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers and other.status_code == 401
    assert "Access-Control-Allow-Origin" not in client.get(
        "/v1/models", headers={"Origin": "https://evil.example", **bearer("alice")}).headers


def test_the_spec_declares_bearer_auth_and_the_auth_answers(make_app, keys_path):
    """/openapi.json (open) has the bearerAuth scheme; each keyed operation names its scope and 401/403/429."""
    document = make_app(API_KEYS_FILE=keys_path).test_client().get("/openapi.json").json
    assert document["components"]["securitySchemes"]["bearerAuth"] == {**document["components"]["securitySchemes"][
        "bearerAuth"], "type": "http", "scheme": "bearer"}
    for path, item in document["paths"].items():
        for method, op in item.items():
            scope = required_scope(path)
            if scope is None:
                assert op["security"] == [], path
                continue
            assert op["security"] == [{"bearerAuth": [scope]}], (path, method)
            assert {"401", "403", "429"} <= set(op["responses"]), (path, method)
            assert "Retry-After" in op["responses"]["429"]["headers"]
