"""Hostile files and oversized requests against real processes: gunicorn, a Celery worker and Redis.

Each hostile upload gets its contract answer (422 invalid_file, 413 too_large, or a job whose bad rows are row
errors), the gunicorn worker's peak memory while it answers stays within MEMORY_BOUND of what it held before,
and a normal job right after succeeds on the same gunicorn worker. The limits themselves are checked on a
second stack whose settings are small (TIGHT), including `source` files read by its worker.
"""
from __future__ import annotations

import gzip
import itertools
import os
import time
from collections.abc import Iterable, Iterator

import orjson
import pyarrow as pa
import pytest
import requests

from shared import keys
from tests.support import hostile
from tests.support.data import BOUNDARY, _multipart_head
from tests.support.processes import ApiServer, CeleryWorker, RedisServer, wait_for

MiB = 1 << 20
MEMORY_BOUND = 200 * MiB
TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
TIGHT = {"MAX_UPLOAD_BYTES": str(8 * MiB), "MAX_JSON_BYTES": str(MiB), "SYNC_MAX_ROWS": "10", "MAX_COLUMNS": "100",
         "MAX_CELL_BYTES": "1024", "MAX_JOB_ROWS": "5000"}
REPORT: list[tuple[str, str, str]] = []


# -- helpers ---------------------------------------------------------------------------------------

def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Start VmHWM again from the current RSS (Linux clear_refs 5); False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def upload(base: str, filename: str, pieces: Iterable[bytes], fields: dict | None = None, *,
           chunked: bool = True, headers: dict | None = None) -> requests.Response:
    """POST /v1/jobs with a multipart body: sent chunked (no Content-Length) as the pieces come, or whole."""
    head = _multipart_head({"model": "fussy", **(fields or {})}, filename, BOUNDARY)
    parts: Iterator[bytes] = itertools.chain([head], pieces, [f"\r\n--{BOUNDARY}--\r\n".encode()])
    body = parts if chunked else b"".join(parts)
    return requests.post(f"{base}/v1/jobs", data=body, timeout=600, headers={
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})})


def assert_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) <= {"code", "message", "details"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def finished(base: str, job_id: str, timeout: float = 300) -> dict:
    def terminal():
        job = requests.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        return job if job["status"] in TERMINAL else None
    return wait_for(terminal, timeout=timeout, interval=0.2, what=f"job {job_id} to finish")


def row_errors(base: str, job_id: str) -> dict[int, dict]:
    response = requests.get(f"{base}/v1/jobs/{job_id}/errors?format=jsonl", timeout=120)
    assert response.status_code == 200, response.text[:300]
    return {e["row"]: e for e in map(orjson.loads, response.content.splitlines())}


def normal_job_succeeds(base: str) -> None:
    """A small, clean CSV job right after: 202, then succeeded."""
    response = upload(base, "normal.csv", [hostile.csv_bytes(50)], chunked=False)
    assert response.status_code == 202, response.text[:300]
    job = finished(base, response.json()["id"])
    assert job["status"] == "succeeded" and job["counts"]["succeeded"] == 50, job


def job_keys(r) -> set:
    return set(r.scan_iter(match=f"{keys.PREFIX}:job:*", count=1000))


# -- default limits: hostile uploads --------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(redis_server, models_dir, worker, tmp_path_factory) -> Iterator[ApiServer]:
    """One gunicorn worker process (so every case lands on it), on the session Redis and worker."""
    proc = ApiServer(redis_server.url, models_dir=models_dir, workers=1, threads=4,
                     log_dir=str(tmp_path_factory.mktemp("api-hostile")))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    if REPORT:
        print("\n\ncase | answer | web worker memory")
        for row in REPORT:
            print(" | ".join(row))


@pytest.mark.parametrize("case", hostile.cases(), ids=lambda c: c.name)
def test_hostile_upload(api, case):
    """The contract's answer, web memory bounded, and a normal job succeeds after it on the same web worker."""
    pid = wait_for(api.worker_pids, timeout=30, what="the gunicorn worker")[0]
    before = memory(pid)["VmRSS"]
    peak_known = reset_peak(pid)
    started = time.monotonic()
    response = upload(api.url, case.filename, case.body(), case.fields)
    seconds = time.monotonic() - started
    after = memory(pid)
    growth = (after["VmHWM"] if peak_known else after["VmRSS"]) - before
    if case.status == 202:
        assert response.status_code == 202, response.text[:500]
        job = finished(api.url, response.json()["id"])
        assert job["status"] == case.job_status, job
        counts = job["counts"]
        assert counts["succeeded"] + counts["failed"] + counts["skipped"] == counts["total"]
        errors = row_errors(api.url, job["id"])
        for row, code in case.row_errors.items():
            assert errors[row]["code"] == code, errors.get(row)
            assert case.message_has in errors[row]["message"]
        codes = ", ".join(sorted(set(case.row_errors.values())))
        answer = f"202, job {job['status']}, {counts['failed']} row errors ({codes})"
    else:
        error = assert_error(response, case.status, case.code)
        assert case.message_has in error["message"], error
        answer = f"{case.status} {error['code']}: {error['message'][:90]}"
    REPORT.append((case.name, answer, f"peak +{growth / MiB:.0f} MiB ({seconds:.1f} s)"))
    assert growth < MEMORY_BOUND, f"web worker grew by {growth / MiB:.0f} MiB"
    assert api.worker_pids() == [pid], "the gunicorn worker was replaced"
    normal_job_succeeds(api.url)


def test_json_nested_deeper_than_orjson_reads(api):
    """A body nested 100,000 deep is 400 malformed_json on the predict and job routes; 300 deep in a row of a
    job is that row's malformed_row (orjson reads 1,024 levels but writes 255), never a 500."""
    deep = "[" * 100_000 + "]" * 100_000
    good = '"f1": 1, "f2": 1, "f3": 1, "f4": 1'
    for url, body in (("/v1/models/fussy/predict", '{"f0": %s, %s}' % (deep, good)),
                      ("/v1/jobs", '{"model": "fussy", "rows": [{"f0": %s, %s}]}' % (deep, good))):
        response = requests.post(api.url + url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert_error(response, 400, "malformed_json")
    body = '{"model": "fussy", "rows": [{"f0": %s, %s}, {"f0": 1, %s}]}' % ("[" * 300 + "]" * 300, good, good)
    response = requests.post(api.url + "/v1/jobs", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 202, response.text[:300]
    job = finished(api.url, response.json()["id"])
    assert job["status"] == "partially_succeeded" and row_errors(api.url, job["id"])[0]["code"] == "malformed_row"


def test_gzip_content_encoding_is_never_inflated(api):
    """A gzip bomb sent with Content-Encoding: gzip is not inflated (neither gunicorn nor werkzeug decodes
    request bodies): the bytes are read as they are, refused, and memory stays flat."""
    bomb = gzip.compress(b"0" * (512 * MiB), compresslevel=9)  # about 500 KiB that would inflate to 512 MiB
    pid = api.worker_pids()[0]
    before = memory(pid)["VmRSS"]
    peak_known = reset_peak(pid)
    response = requests.post(f"{api.url}/v1/jobs", data=bomb, timeout=60, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert 400 <= response.status_code < 500 and response.json()["error"]["code"]
    response = upload(api.url, "input.csv", [bomb], headers={"Content-Encoding": "gzip"})
    assert 400 <= response.status_code < 500 and response.json()["error"]["code"]
    after = memory(pid)
    assert (after["VmHWM"] if peak_known else after["VmRSS"]) - before < MEMORY_BOUND
    normal_job_succeeds(api.url)


def test_unsupported_content_encoding_is_415(api):
    body = gzip.compress(orjson.dumps({"model": "fussy", "rows": [{"f0": 1}]}))
    response = requests.post(f"{api.url}/v1/jobs", data=body, timeout=60, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert_error(response, 415)


# -- small limits ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tight(models_dir, tmp_path_factory):
    """Redis, worker and API of their own, all with the TIGHT limits and a source root."""
    root = tmp_path_factory.mktemp("sources")
    env = {**TIGHT, "SOURCE_ROOTS": str(root)}
    server = RedisServer(dir=str(tmp_path_factory.mktemp("redis-tight")))
    server.start()
    proc = CeleryWorker(server.url, models_dir=models_dir, env=env, concurrency=2,
                        log_dir=str(tmp_path_factory.mktemp("worker-tight")))
    api = ApiServer(server.url, models_dir=models_dir, env=env, workers=1,
                    log_dir=str(tmp_path_factory.mktemp("api-tight")))
    r = server.client()
    try:
        proc.start()
        api.start()
        yield type("Tight", (), {"url": api.url, "redis": r, "root": root, "worker": proc})
    finally:
        r.close()
        api.stop()
        proc.stop()
        server.stop()


def settled(env) -> bool:
    return env.redis.llen("predq.chunks") == 0 and env.redis.hlen("unacked") == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_larger_than_max_upload_bytes_is_413(tight, chunked):
    """A multipart body over MAX_UPLOAD_BYTES is 413 too_large, with or without a Content-Length; a job begun
    from the chunked one's first rows is removed."""
    wait_for(lambda: settled(tight), timeout=120, what="the tight worker to be idle")
    before = job_keys(tight.redis)
    line = b"r,1,2,3,4,5\n"
    pieces = (line * (MiB // len(line)) for _ in range(10))
    response = upload(tight.url, "input.csv", itertools.chain([hostile.HEADER], pieces), {"chunk_size": "10000"},
                      chunked=chunked)
    assert_error(response, 413, "too_large")
    wait_for(lambda: settled(tight), timeout=120, what="the tight worker to take the discarded job's chunks")
    time.sleep(1)
    assert job_keys(tight.redis) == before
    normal_job_succeeds(tight.url)


def test_upload_too_large_names_max_upload_bytes(tight):
    response = upload(tight.url, "input.csv", [hostile.HEADER, b"x" * (9 * MiB)], chunked=False)
    error = assert_error(response, 413, "too_large")
    assert "MAX_UPLOAD_BYTES" in error["message"] and error["details"]["limit"] == "MAX_UPLOAD_BYTES"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_json_body_larger_than_max_json_bytes_is_413(tight, chunked):
    body = orjson.dumps({"model": "fussy", "rows": [{"f0": 1.0, "pad": "p" * 1000}] * 1100})
    for url in ("/v1/jobs", "/v1/models/fussy/predict"):
        data = (body[i:i + 65536] for i in range(0, len(body), 65536)) if chunked else body
        response = requests.post(tight.url + url, data=data, headers={"Content-Type": "application/json"}, timeout=60)
        error = assert_error(response, 413, "too_large")
        assert "MAX_JSON_BYTES" in error["message"]


def test_json_too_large_has_details_limit(tight):
    body = orjson.dumps({"model": "fussy", "rows": [{"pad": "p" * 1000}] * 1100})
    response = requests.post(tight.url + "/v1/jobs", data=body, headers={"Content-Type": "application/json"},
                             timeout=60)
    assert assert_error(response, 413, "too_large")["details"]["limit"] == "MAX_JSON_BYTES"


def test_sync_rows_past_sync_max_rows_is_413(tight):
    rows = [{"f0": 1, "f1": 1, "f2": 1, "f3": 1, "f4": 1}]
    ok = requests.post(tight.url + "/v1/models/fussy/predict", json=rows * 10, timeout=60)
    assert ok.status_code == 200
    error = assert_error(requests.post(tight.url + "/v1/models/fussy/predict", json=rows * 11, timeout=60), 413,
                         "too_many_rows")
    assert "/v1/jobs" in error["message"]


def test_sync_too_many_rows_names_sync_max_rows(tight):
    rows = [{"f0": 1, "f1": 1, "f2": 1, "f3": 1, "f4": 1}] * 11
    error = assert_error(requests.post(tight.url + "/v1/models/fussy/predict", json=rows, timeout=60), 413)
    assert "SYNC_MAX_ROWS" in error["message"] and error["details"]["limit"] == "SYNC_MAX_ROWS"


@pytest.mark.parametrize("filename,body", [
    ("wide.csv", (",".join(f"c{i}" for i in range(101)) + "\n1\n").encode()),
    ("wide.jsonl", orjson.dumps({f"c{i}": 1 for i in range(101)}) + b"\n"),
    ("wide.parquet", hostile.parquet_bytes(pa.table({f"c{i}": [1.0] for i in range(101)}))),
], ids=["csv", "jsonl", "parquet"])
def test_more_columns_than_max_columns_is_422(tight, filename, body):
    error = assert_error(upload(tight.url, filename, [body]), 422, "invalid_file")
    assert "MAX_COLUMNS" in error["message"] and error["details"]["limit"] == "MAX_COLUMNS"


def test_long_cell_fails_its_row(tight):
    """A value longer than MAX_CELL_BYTES is its row's invalid_value, in a CSV piece parsed by the worker, in JSON
    Lines and in JSON rows; the other rows succeed."""
    csv = hostile.csv_bytes(20).replace(b"r7,", b"r7" + b"x" * 2000 + b",", 1)
    jsonl = hostile.jsonl_bytes(20).replace(b'"r7"', b'"r7' + b"x" * 2000 + b'"', 1)
    rows = [dict(r, id=r["id"] + "x" * 2000 if r["id"] == "r7" else r["id"]) for r in hostile.good_rows(20)]
    jobs = [upload(tight.url, "long.csv", [csv], {"id_column": "id"}),
            upload(tight.url, "long.jsonl", [jsonl], {"id_column": "id"}),
            requests.post(tight.url + "/v1/jobs", json={"model": "fussy", "rows": rows, "id_column": "id"}, timeout=60)]
    for response in jobs:
        assert response.status_code == 202, response.text[:300]
        job = finished(tight.url, response.json()["id"])
        assert job["status"] == "partially_succeeded" and job["counts"]["failed"] == 1, job
        error = row_errors(tight.url, job["id"])[7]
        assert error["code"] == "invalid_value" and "MAX_CELL_BYTES" in error["message"]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_more_rows_than_max_job_rows_is_413_and_leaves_nothing(tight, fmt):
    """Past MAX_JOB_ROWS an input is 413 too_large naming the limit; the job and every chunk it stored go."""
    wait_for(lambda: settled(tight), timeout=120, what="the tight worker to be idle")
    before = job_keys(tight.redis)
    if fmt == "json":
        response = requests.post(tight.url + "/v1/jobs", timeout=60, json={
            "model": "fussy", "chunk_size": 1000, "rows": [{"f0": 1}] * 5001})
    elif fmt == "csv":
        response = upload(tight.url, "many.csv", [hostile.csv_bytes(6000)], {"chunk_size": "1000"})
    else:
        response = upload(tight.url, "many.parquet", [hostile.good_parquet(6000)])
    error = assert_error(response, 413, "too_large")
    assert "MAX_JOB_ROWS" in error["message"] and error["details"]["limit"] == "MAX_JOB_ROWS"
    wait_for(lambda: settled(tight), timeout=120, what="the tight worker to take the discarded job's chunks")
    time.sleep(1)  # a chunk taken just before the discard commits nothing: give it the time to try
    assert job_keys(tight.redis) == before
    normal_job_succeeds(tight.url)


def source_job(env, path: str) -> dict:
    response = requests.post(env.url + "/v1/jobs", json={"model": "fussy", "source": path}, timeout=60)
    assert response.status_code == 202, response.text[:300]
    return finished(env.url, response.json()["id"])


@pytest.mark.parametrize("name,filename,body,code", [
    ("parquet named .csv", "p.csv", hostile.good_parquet(100), "invalid_file"),
    ("gzip named .csv", "g.csv", gzip.compress(hostile.csv_bytes(100)), "invalid_file"),
    ("png named .jsonl", "i.jsonl", hostile._png(), "invalid_file"),
    ("csv named .parquet", "c.parquet", hostile.csv_bytes(100), "invalid_file"),
    ("parquet without footer", "t.parquet", hostile._truncated_parquet(), "invalid_file"),
    ("csv not utf-8", "l.csv", hostile._latin1_csv(), "invalid_file"),
    ("csv header of 200 columns", "w.csv", (",".join(f"c{i}" for i in range(200)) + "\n").encode(), "invalid_file"),
    ("binary garbage", "b.csv", hostile._garbage(MiB), "invalid_file"),
    ("larger than MAX_UPLOAD_BYTES", "big.csv", hostile.HEADER + b"1,2,3,4,5,6\n" * 800_000, "too_large"),
    ("more rows than MAX_JOB_ROWS", "rows.csv", hostile.csv_bytes(6000), "too_large"),
    ("a FIFO", "fifo.csv", None, "invalid_file"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_hostile_source_fails_the_job(tight, name, filename, body, code):
    """A hostile `source` file ends its job failed with the code, and the worker reads the next one fine."""
    path = tight.root / filename
    if body is None:
        if not path.exists():
            os.mkfifo(path)
    else:
        path.write_bytes(body)
    job = source_job(tight, str(path))
    assert job["status"] == "failed" and job["error"]["code"] == code, job
    good = tight.root / "good.csv"
    good.write_bytes(hostile.csv_bytes(100))
    assert source_job(tight, f"file://{good}")["status"] == "succeeded"
    assert tight.worker.running
