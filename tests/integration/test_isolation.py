"""API keys against a real gunicorn, a real worker and a real Redis: each key sees only its own jobs, every keyed
route refuses without a key, limits hold across web processes, and no web process serves an exposed address
without keys."""
from __future__ import annotations

import json
import socket
import uuid

import pytest
import requests

from api.errors import protocol
from shared.auth import new_key
from shared.jobs import JobOptions, JobStore
from tests.support.processes import ApiServer, ProcessExitedError, wait_for

KEYS = {name: new_key(name, scopes) for name, scopes in {
    "alice": ["predict", "jobs"], "bob": ["predict", "jobs"], "predictor": ["predict"], "ops": ["admin"]}.items()}
TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
ROWS = [{"f0": 0.1 * i, "f1": 1.0, "f2": 2.0, "f3": 3.0, "f4": 4.0} for i in range(20)]
BAD_ROW = {"f0": "not a number", "f1": 1.0, "f2": 2.0, "f3": 3.0, "f4": 4.0}
WRONG_KEY = "pq_" + "Z" * 43


class BoundApiServer(ApiServer):
    """The test ApiServer on another bind address, optionally with another gunicorn config file."""

    def __init__(self, *args, host: str = "0.0.0.0", config: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = host
        self.config = config

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("--bind")
        cmd[at + 1] = f"{self.host}:{self.port}"
        if self.config is not None:
            cmd[at:at] = ["--config", self.config]
        return cmd


def write_keys(path, entries) -> str:
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


def call(server: ApiServer, method: str, path: str, key: str | None = None, *, base: str | None = None,
         **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {KEYS[key][0] if key in KEYS else key}"
    return requests.request(method, f"{base or server.url}{path}", headers=headers, timeout=60, **kwargs)


def error_code(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:200]
    return response.json()["error"]["code"]


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the one a default route would use), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # UDP: nothing is sent
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sources")
    (path / "in.csv").write_text("f0,f1,f2,f3,f4\n" + "".join(f"{i},1,2,3,4\n" for i in range(10)))
    return str(path)


@pytest.fixture(scope="module")
def server(redis_server, models_dir, source_dir, tmp_path_factory):
    """gunicorn with four keys, bound to 0.0.0.0: it starts because keys are configured."""
    tmp = tmp_path_factory.mktemp("isolation")
    keys_file = write_keys(tmp / "keys.json", [entry for _, entry in KEYS.values()])
    proc = BoundApiServer(redis_server.url, models_dir=models_dir, log_dir=str(tmp),
                          env={"API_KEYS_FILE": keys_file, "AUTH": "on", "SOURCE_ROOTS": source_dir})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def create(server, key: str, rows=ROWS, **headers) -> dict:
    response = call(server, "POST", "/v1/jobs", key, json={"model": "fussy", "rows": rows}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def wait_terminal(server, key: str, job_id: str) -> dict:
    def done():
        job = call(server, "GET", f"/v1/jobs/{job_id}", key).json()
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout=120, what=f"job {job_id} to finish")


@pytest.fixture(scope="module")
def alices_job(server, worker) -> dict:
    """A finished job of alice's, with one row error."""
    job = create(server, "alice", ROWS + [BAD_ROW])
    return wait_terminal(server, "alice", job["id"])


def listed(server, key: str, **params) -> set[str]:
    response = call(server, "GET", "/v1/jobs", key, params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    return {j["id"] for j in response.json()["data"]}


# -- ownership -------------------------------------------------------------------------------------------

def test_another_key_gets_404_for_every_route_of_a_job(server, alices_job):
    """bob gets job_not_found for alice's status, results, errors, cancel and delete; the job is unharmed."""
    job_id = alices_job["id"]
    assert alices_job["status"] == "partially_succeeded"
    for method, suffix in (("GET", ""), ("GET", "/results"), ("GET", "/errors"), ("POST", "/cancel"),
                           ("DELETE", "")):
        for key in ("bob", "predictor"):
            response = call(server, method, f"/v1/jobs/{job_id}{suffix}", key)
            expected = 404 if key == "bob" else 403
            assert response.status_code == expected, (key, method, suffix, response.text)
            if key == "bob":  # word for word what a job that never existed gets
                assert error_code(response) == "job_not_found"
                unknown = f"job_{'0' * 26}"
                never = call(server, method, f"/v1/jobs/{unknown}{suffix}", "bob").json()
                assert response.json()["error"]["message"] == never["error"]["message"].replace(unknown, job_id)
    # Still there, for its owner and for admin: the owner's cancel is a 409 (finished), not bob's 404.
    for key in ("alice", "ops"):
        assert call(server, "GET", f"/v1/jobs/{job_id}", key).status_code == 200
        assert call(server, "GET", f"/v1/jobs/{job_id}/results", key).status_code == 200
        errors = call(server, "GET", f"/v1/jobs/{job_id}/errors", key)
        assert errors.status_code == 200 and json.loads(errors.text.splitlines()[0])["row"] == len(ROWS)
        assert error_code(call(server, "POST", f"/v1/jobs/{job_id}/cancel", key)) == "job_finished"


def test_another_key_never_lists_a_job_and_admin_lists_all(server, alices_job, worker):
    """GET /v1/jobs shows a key its own jobs only (with or without a status filter); admin sees every key's."""
    bobs = create(server, "bob")["id"]
    wait_terminal(server, "bob", bobs)
    assert alices_job["id"] in listed(server, "alice") and bobs not in listed(server, "alice")
    assert bobs in listed(server, "bob") and alices_job["id"] not in listed(server, "bob")
    assert alices_job["id"] not in listed(server, "bob", status="partially_succeeded")
    assert {alices_job["id"], bobs} <= listed(server, "ops")


def test_the_owner_deletes_and_nobody_else_can(server, worker):
    """bob's DELETE of alice's finished job is a 404 and changes nothing; alice's removes it for everyone."""
    job_id = create(server, "alice")["id"]
    wait_terminal(server, "alice", job_id)
    assert call(server, "DELETE", f"/v1/jobs/{job_id}", "bob").status_code == 404
    assert call(server, "GET", f"/v1/jobs/{job_id}", "ops").status_code == 200
    assert call(server, "DELETE", f"/v1/jobs/{job_id}", "alice").status_code == 204
    for key in ("alice", "ops"):
        assert call(server, "GET", f"/v1/jobs/{job_id}", key).status_code == 404


def test_a_job_without_an_owner_is_seen_by_admin_only(server, redis_server):
    """A scheduled run (or a job made without keys) belongs to no key: admin sees it, other keys do not."""
    store = JobStore(redis_server.client(), result_ttl=3600)
    job_id = store.create(model="fussy", version="v1", sha256="x", options=JobOptions(), metadata={},
                          source_format="csv", run={"name": "nightly", "slot": "s", "date": "2026-11-28"})
    try:
        assert call(server, "GET", f"/v1/jobs/{job_id}", "alice").status_code == 404
        assert job_id not in listed(server, "alice")
        assert call(server, "GET", f"/v1/jobs/{job_id}", "ops").json()["schedule"]["name"] == "nightly"
        assert job_id in listed(server, "ops")
    finally:
        store.discard(job_id)


def test_a_source_job_belongs_to_the_key_that_asked_for_it(server, source_dir, worker):
    """A job whose input the workers read is owned like any other."""
    response = call(server, "POST", "/v1/jobs", "alice",
                    json={"model": "fussy", "source": f"file://{source_dir}/in.csv"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert call(server, "GET", f"/v1/jobs/{job_id}", "bob").status_code == 404
    assert job_id in listed(server, "alice") and job_id not in listed(server, "bob")
    # The session worker has no SOURCE_ROOTS of its own, so it may refuse to read the file: ownership is the point.
    wait_terminal(server, "alice", job_id)
    assert call(server, "GET", f"/v1/jobs/{job_id}", "bob").status_code == 404


def test_idempotency_keys_of_two_api_keys_never_meet(server, worker):
    """alice and bob send the same Idempotency-Key with different bodies: two jobs, no conflict; repeats find their own."""
    key = f"k-{uuid.uuid4()}"
    a = create(server, "alice", ROWS[:5], **{"Idempotency-Key": key})
    b = create(server, "bob", ROWS[5:], **{"Idempotency-Key": key})
    assert a["id"] != b["id"]
    again = call(server, "POST", "/v1/jobs", "alice", json={"model": "fussy", "rows": ROWS[:5]},
                 headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["id"] == a["id"]
    for owner, job in (("alice", a), ("bob", b)):
        wait_terminal(server, owner, job["id"])


# -- keys and scopes ----------------------------------------------------------------------------------------

def documented(server) -> list[tuple[str, str, list]]:
    """(method, path with its parameters filled in, security) of every operation in /openapi.json."""
    response = call(server, "GET", "/openapi.json")
    assert response.status_code == 200  # open, without a key
    return [(method.upper(), path.replace("{", "").replace("}", ""), op["security"])
            for path, item in response.json()["paths"].items() for method, op in item.items()]


def test_every_keyed_route_refuses_a_missing_or_wrong_key(server):
    """Every documented route but the health routes and the spec: 401 (unauthorized) with WWW-Authenticate: Bearer."""
    operations = documented(server)
    assert len([op for op in operations if op[2]]) >= 14
    for method, path, security in operations:
        if not security:
            assert call(server, method, path).status_code in (200, 503), path
            continue
        for key in (None, WRONG_KEY):
            response = call(server, method, path, key)
            assert response.status_code == 401, (method, path, key, response.text)
            kind = protocol(path)  # MLflow's and the OIP's routes answer in their own error bodies
            if kind == "mlflow":
                assert response.json()["error_code"] == "UNAUTHENTICATED"
            elif kind == "oip":
                assert "API key" in response.json()["error"]
            else:
                assert error_code(response) == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_health_routes_answer_without_a_key(server):
    """/healthz and /readyz need no key, whatever keys are configured."""
    assert call(server, "GET", "/healthz").json() == {"status": "ok"}
    assert call(server, "GET", "/readyz").status_code in (200, 503)


def test_a_key_without_the_scope_is_403_naming_it(server):
    """predict-only keys cannot reach jobs; jobs keys cannot reach schedules or metrics; admin reaches all."""
    cases = [("predictor", "GET", "/v1/jobs", "jobs"), ("predictor", "POST", "/v1/jobs", "jobs"),
             ("alice", "GET", "/v1/schedules", "admin"), ("alice", "POST", "/v1/schedules/x/run", "admin"),
             ("alice", "GET", "/metrics", "admin")]
    for key, method, path, scope in cases:
        response = call(server, method, path, key)
        assert response.status_code == 403, (key, path)
        assert error_code(response) == "forbidden" and response.json()["error"]["details"] == {"required_scope": scope}
    assert call(server, "GET", "/v1/models", "predictor").status_code == 200
    assert call(server, "GET", "/metrics", "ops").status_code == 200
    assert call(server, "GET", "/v1/schedules", "ops").status_code == 200


def test_security_headers_on_real_answers(server):
    """200, 401 and 404 answers of gunicorn all carry the security headers and no CORS header."""
    for response in (call(server, "GET", "/healthz"), call(server, "GET", "/v1/models"),
                     call(server, "GET", "/nowhere", "ops")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "Access-Control-Allow-Origin" not in response.headers


def raw(server: ApiServer, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_requests_gunicorn_refuses_itself_get_json(server):
    """An over-long request line (414), too many header fields (431) or bytes that are not HTTP (400): JSON bodies."""
    cases = [(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
             (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
              431, "headers_too_large"),
             (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
             (b"\x16\x03\x01 not http\r\n\r\n", 400, "bad_request")]
    for request, status, code in cases:
        head, _, body = raw(server, request).partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["error"]["code"] == code


def test_keys_never_reach_the_log(server):
    """After good keys, a wrong key and a malformed header line holding a key, the server log holds none of them."""
    call(server, "GET", "/v1/models", WRONG_KEY)
    call(server, "GET", "/v1/models", "alice")
    raw(server, f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization Bearer {KEYS['bob'][0]}\r\n\r\n".encode())
    log = wait_for(lambda: (text := server.log()) and "Invalid HTTP Header" in text and text, timeout=30,
                   what="gunicorn to log the malformed header")
    assert "unknown API key" in log and "[redacted]" in log
    assert "API keys required (4 keys from" in log and f"on 0.0.0.0:{server.port}" in log
    for secret in [WRONG_KEY] + [key for key, _ in KEYS.values()]:
        assert secret not in log


# -- rate limits -------------------------------------------------------------------------------------------

def test_past_the_limit_a_key_gets_429_with_retry_after(redis_server, models_dir, tmp_path):
    """5 requests a minute, counted across two gunicorn workers: the 6th is 429; health and other keys go on."""
    # Names of their own: the counters live in the session Redis, which other tests' servers count in too.
    (limited, limited_entry), (other, other_entry) = (new_key(f"{name}-{uuid.uuid4().hex[:8]}", ["predict"])
                                                      for name in ("limited", "other"))
    keys_file = write_keys(tmp_path / "keys.json", [limited_entry, other_entry])
    server = ApiServer(redis_server.url, models_dir=models_dir, workers=2, log_dir=str(tmp_path),
                       env={"API_KEYS_FILE": keys_file, "RATE_LIMIT_PER_MINUTE": "5"})
    try:
        server.start()
        # A new connection each time, so both worker processes answer some of them.
        statuses = [call(server, "GET", "/v1/models", limited).status_code for _ in range(5)]
        assert statuses == [200] * 5
        refused = call(server, "GET", "/v1/models", limited)
        assert refused.status_code == 429 and error_code(refused) == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 120
        assert all(call(server, "GET", "/healthz").status_code == 200 for _ in range(10))
        assert call(server, "GET", "/v1/models", other).status_code == 200
    finally:
        server.cleanup()


# -- serving without keys ---------------------------------------------------------------------------------

NO_KEYS = {"API_KEYS_FILE": "", "AUTH": "on"}


def test_an_exposed_bind_without_keys_refuses_to_start(redis_server, models_dir, tmp_path):
    """gunicorn on 0.0.0.0 with no keys and AUTH on exits with status 1 before serving, saying why."""
    server = BoundApiServer(redis_server.url, models_dir=models_dir, log_dir=str(tmp_path), env=NO_KEYS)
    try:
        with pytest.raises(ProcessExitedError):
            server.start()
        assert server.returncode == 1
        assert f"refusing to serve without API keys on 0.0.0.0:{server.port}" in server.log()
    finally:
        server.cleanup()


def test_a_bad_key_file_stops_the_start(redis_server, models_dir, tmp_path):
    """An unreadable key file is a start error naming the file, not a server without keys."""
    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": [{"name": "a", "sha256": "the key itself", "scopes": ["jobs"]}]}')
    server = ApiServer(redis_server.url, models_dir=models_dir, log_dir=str(tmp_path), env={"API_KEYS_FILE": str(bad)})
    try:
        with pytest.raises(ProcessExitedError):
            server.start()
        assert server.returncode != 0
        assert f"API_KEYS_FILE {bad}" in server.log() and "sha256" in server.log()
    finally:
        server.cleanup()


def test_auth_off_serves_an_exposed_bind_without_keys(redis_server, models_dir, tmp_path):
    """AUTH=off: 0.0.0.0 without keys starts, says so, and answers keyless requests on every address."""
    server = BoundApiServer(redis_server.url, models_dir=models_dir, log_dir=str(tmp_path),
                            env={**NO_KEYS, "AUTH": "off"})
    try:
        server.start()
        assert "auth: AUTH=off, serving without API keys" in server.log()
        assert call(server, "GET", "/v1/models").status_code == 200
        address = non_loopback_address()
        if address is not None:
            assert call(server, "GET", "/v1/models", base=f"http://{address}:{server.port}").status_code == 200
    finally:
        server.cleanup()


def test_without_the_start_check_requests_to_other_addresses_are_refused(redis_server, models_dir, tmp_path):
    """A server that skips gunicorn.conf.py (another config file) still refuses keyless requests off loopback."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to send a request to")
    empty = tmp_path / "other.conf.py"
    empty.write_text("")
    server = BoundApiServer(redis_server.url, models_dir=models_dir, log_dir=str(tmp_path), env=NO_KEYS,
                            config=str(empty))
    try:
        server.start()
        outside = f"http://{address}:{server.port}"
        refused = call(server, "GET", "/v1/models", base=outside)
        assert refused.status_code == 403 and error_code(refused) == "auth_not_configured"
        assert call(server, "GET", "/healthz", base=outside).status_code == 200
        assert call(server, "GET", "/v1/models").status_code == 200  # loopback
    finally:
        server.cleanup()
