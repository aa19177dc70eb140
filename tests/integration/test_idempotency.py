"""Idempotency-Key: retries and concurrent duplicates of a job request make one job."""
from __future__ import annotations

import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import requests

from shared import keys
from tests.support import data
from tests.support.processes import wait_for

ROWS = [{"f0": 1.0, "f1": 2.0, "f2": 3.0, "f3": 4.0, "f4": float(i)} for i in range(50)]


def _jobs(redis_server) -> set[bytes]:
    return set(redis_server.client().zrange(keys.JOBS, 0, -1))


def test_fifty_concurrent_requests_with_one_key_make_one_job(api_server, worker, redis_server):
    """50 simultaneous POSTs with the same key: one job; the others get it back (200) or are told to retry (409)."""
    key = str(uuid.uuid4())
    before = _jobs(redis_server)

    def post(_):
        return requests.post(f"{api_server.url}/v1/jobs", json={"model": "fussy", "rows": ROWS}, timeout=60,
                             headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(50)))
    created = _jobs(redis_server) - before
    assert len(created) == 1
    job_id = created.pop().decode()
    statuses = sorted({r.status_code for r in responses})
    assert [r.status_code for r in responses].count(202) == 1
    assert set(statuses) <= {200, 202, 409}
    for r in responses:
        if r.status_code in (200, 202):
            assert r.json()["id"] == job_id
        else:
            assert r.json()["error"]["code"] == "idempotency_in_progress" and r.headers["Retry-After"]
    again = post(None)
    assert again.status_code == 200 and again.json()["id"] == job_id


def test_same_key_with_another_body_is_a_conflict(api_server, worker, redis_server):
    """Reusing a key for a different request answers 409 idempotency_conflict and makes nothing."""
    key = str(uuid.uuid4())
    first = requests.post(f"{api_server.url}/v1/jobs", json={"model": "fussy", "rows": ROWS},
                          headers={"Idempotency-Key": key}, timeout=60)
    assert first.status_code == 202
    before = _jobs(redis_server)
    other = requests.post(f"{api_server.url}/v1/jobs", json={"model": "fussy", "rows": ROWS[:10]},
                          headers={"Idempotency-Key": key}, timeout=60)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert _jobs(redis_server) == before


def test_an_upload_repeated_with_its_key_returns_the_first_job(api_server, worker, redis_server):
    """The same multipart upload sent twice with one key is one job."""
    planted = data.planted_csv(2000)
    body, content_type = data.multipart({"model": "fussy"}, planted.filename, planted.body)
    headers = {"Content-Type": content_type, "Idempotency-Key": str(uuid.uuid4())}
    first = requests.post(f"{api_server.url}/v1/jobs", data=body, headers=headers, timeout=60)
    second = requests.post(f"{api_server.url}/v1/jobs", data=body, headers=headers, timeout=60)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    changed, _ = data.multipart({"model": "fussy", "chunk_size": "100"}, planted.filename, planted.body)
    third = requests.post(f"{api_server.url}/v1/jobs", data=changed, headers=headers, timeout=60)
    assert third.status_code == 409 and third.json()["error"]["code"] == "idempotency_conflict"


def test_a_retry_after_a_dropped_upload_makes_one_job(api_server, worker, redis_server):
    """The connection drops mid-upload; the retry with the same key creates the only job."""
    planted = data.planted_csv(100_000)
    body, content_type = data.multipart({"model": "fussy", "chunk_size": "5000"}, planted.filename, planted.body)
    key = str(uuid.uuid4())
    before = _jobs(redis_server)
    r = redis_server.client()
    url = urlparse(api_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nIdempotency-Key: {key}\r\n\r\n").encode())
        sock.sendall(body[: len(body) // 2])
        # The first request has made its job and stored chunks before the connection drops.
        wait_for(lambda: _jobs(redis_server) - before, timeout=60, what="the first request's job to exist")
    wait_for(lambda: not (_jobs(redis_server) - before), timeout=60, what="the broken upload's job to be removed")
    wait_for(lambda: r.get(keys.idempotency(key)) is None, timeout=60, what="the key to be released")

    retry = requests.post(f"{api_server.url}/v1/jobs", data=body, headers={"Content-Type": content_type,
                          "Idempotency-Key": key}, timeout=120)
    assert retry.status_code == 202, retry.text
    assert _jobs(redis_server) - before == {retry.json()["id"].encode()}
    assert retry.json()["counts"]["total"] == 100_000
