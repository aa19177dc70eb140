"""Metrics, logs and task events with real processes: gunicorn, a Celery worker, a Redis-compatible server."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from shared.dispatch import PROCESS_CHUNK, make_celery
from shared.settings import load_settings
from tests.support.models import SENTINEL, training_frame
from tests.support.processes import ApiServer, wait_for

TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
PREDICT = "/v1/models/<name>/predict"


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of /metrics, parsed by prometheus_client: (sample name, sorted labels) -> value."""
    response = requests.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def sample(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(log: str) -> list[dict]:
    """The JSON lines of a log (Celery's banner is not JSON; the last line may be half written)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                found.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return found


def planted_rows(n: int) -> tuple[list[dict], set[int]]:
    """n rows for the `fussy` model; the returned positions fail: a text value, a missing feature, the SENTINEL."""
    rows = training_frame(n, seed=5).to_dict(orient="records")
    rows[3]["f1"] = "not a number"
    del rows[120]["f4"]
    rows[181]["f2"] = SENTINEL  # the model itself raises on this row
    rows[n - 1]["f0"] = "x"
    return rows, {3, 120, 181, n - 1}


def wait_terminal(url: str, job_id: str) -> dict:
    def done():
        job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout=120, interval=0.2, what=f"job {job_id} to finish")


def test_a_job_is_counted_exactly(clean_redis, api_server, worker):
    """After a job with bad rows: rows, failures, chunks and the chunk histogram equal the job's own counts."""
    before = scrape(api_server.url)
    rows, bad = planted_rows(250)
    created = requests.post(f"{api_server.url}/v1/jobs", json={"model": "fussy", "rows": rows, "chunk_size": 50},
                            timeout=60)
    assert created.status_code == 202, created.text
    job = wait_terminal(api_server.url, created.json()["id"])
    assert job["status"] == "partially_succeeded"
    assert job["counts"] == {"total": 250, "succeeded": 250 - len(bad), "failed": len(bad), "skipped": 0}

    # The worker logs a chunk's line after counting it (and the job's end): once the five lines are there, so are
    # the counts. Each line is JSON and names the job, the chunk, the model and its version.
    def committed_lines() -> list[dict]:
        found = [e for e in json_lines(worker.log()) if e.get("job_id") == job["id"]
                 and e["message"] == "chunk committed"]
        return found if len(found) == 5 else []

    committed = wait_for(committed_lines, timeout=60, what="the worker to log the job's five chunks")
    assert sorted(e["chunk"] for e in committed) == [0, 1, 2, 3, 4]
    for entry in committed:
        assert (entry["model"], entry["version"], entry["level"]) == ("fussy", "v1", "info"), entry

    after = scrape(api_server.url)
    counts = job["counts"]
    assert sample(after, "predq_rows_processed_total", model="fussy") == counts["succeeded"] + counts["failed"]
    assert sample(after, "predq_rows_failed_total", model="fussy") == counts["failed"]
    committed = {dict(labels).get("worker"): v for (name, labels), v in after.items()
                 if name == "predq_chunks_committed_total" and dict(labels).get("model") == "fussy"}
    assert sum(committed.values()) == 5 and all("@" in name for name in committed), committed
    assert sample(after, "predq_chunk_duration_seconds_count", model="fussy") == 5
    assert sample(after, "predq_chunk_duration_seconds_bucket", model="fussy", le="+Inf") == 5
    assert sample(after, "predq_chunk_duration_seconds_sum", model="fussy") > 0
    assert sample(after, "predq_jobs_finished_total", status="partially_succeeded") == 1
    assert sample(after, "predq_jobs", status="running") == 0 and sample(after, "predq_jobs_active") == 0
    assert sample(after, "predq_queue_length") == 0 and sample(after, "predq_queue_oldest_age_seconds") == 0
    assert sample(after, "predq_redis_up") == 1

    created_count = dict(name="predq_http_request_duration_seconds_count", route="/v1/jobs", method="POST",
                         status="202")
    assert sample(after, **created_count) - sample(before, **created_count) == 1
    polled = dict(name="predq_http_request_duration_seconds_count", route="/v1/jobs/<job_id>", method="GET",
                  status="200")
    assert sample(after, **polled) > sample(before, **polled)


@pytest.fixture(scope="module")
def two_web_processes(redis_server, models_dir, tmp_path_factory):
    """gunicorn with 2 worker processes, counting into a metrics directory the test can look into."""
    metrics_dir = tmp_path_factory.mktemp("prometheus")
    # A leftover of an earlier run: gunicorn must not add its counts to this run's.
    (metrics_dir / "counter_1.db").write_bytes(Path(_leftover_counter(tmp_path_factory)).read_bytes())
    server = ApiServer(redis_server.url, models_dir=models_dir, workers=2, threads=4,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
                       log_dir=str(tmp_path_factory.mktemp("api-two")))
    server.start()
    try:
        yield server, metrics_dir
    finally:
        server.stop()


def _leftover_counter(tmp_path_factory) -> str:
    """A counter file as a previous gunicorn run would have left it: 1000 predictions of `fussy`."""
    where = tmp_path_factory.mktemp("leftover")
    code = ("from prometheus_client import Counter; "
            "Counter('predq_predictions', 'x', ['model', 'version']).labels('fussy', 'v1').inc(1000)")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(where)},
                   check=True, timeout=60)
    (path,) = glob.glob(str(where / "counter_*.db"))
    return path


def _predictions_by_process(metrics_dir: Path) -> dict[str, float]:
    """Predictions of `fussy` in each process's own counter file."""
    found = {}
    for path in glob.glob(str(metrics_dir / "counter_*.db")):
        for family in MultiProcessCollector.merge([path]):
            for s in family.samples:
                if s.name == "predq_predictions_total" and s.labels == {"model": "fussy", "version": "v1"}:
                    found[path] = s.value
    return found


def test_predictions_are_counted_across_web_processes(two_web_processes):
    """N single predictions served by 2 gunicorn processes: a scrape of either shows N, and N request latencies."""
    server, metrics_dir = two_web_processes
    assert _predictions_by_process(metrics_dir) == {}  # the leftover file was removed at start
    url = f"{server.url}/v1/models/fussy/predict"
    rows = training_frame(16, seed=9).to_dict(orient="records")
    sent = [0]

    def post_round() -> bool:
        with ThreadPoolExecutor(8) as pool:  # a new connection per request: either process may accept it
            codes = list(pool.map(lambda row: requests.post(url, json=row, timeout=30).status_code, rows))
        assert codes == [200] * len(rows)
        sent[0] += len(rows)
        counted = _predictions_by_process(metrics_dir)
        return len(counted) == 2 and all(v > 0 for v in counted.values())

    wait_for(post_round, timeout=60, interval=0, what="both web processes to serve predictions")
    n = sent[0]
    assert sum(_predictions_by_process(metrics_dir).values()) == n
    for _ in range(6):  # new connections again: the scrapes land on either process
        samples = scrape(server.url)
        assert sample(samples, "predq_predictions_total", model="fussy", version="v1") == n
        assert sample(samples, "predq_http_request_duration_seconds_count", route=PREDICT, method="POST",
                      status="200") == n


def test_a_worker_sends_task_events(api_server, worker, redis_url):
    """With task events on, a receiver (as Flower runs one) sees a chunk task sent, received and succeeded."""
    app = make_celery(load_settings({"REDIS_URL": redis_url}))
    seen: list[dict] = []
    ready = threading.Event()

    def record(event: dict) -> None:
        seen.append(event)
        ready.set()

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": record})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True)
        thread.start()
        try:
            assert ready.wait(60), "no event (not even a worker heartbeat) reached the receiver"
            rows, _ = planted_rows(200)
            created = requests.post(f"{api_server.url}/v1/jobs", json={"model": "fussy", "rows": rows}, timeout=60)
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]

            def chunk_task(kind: str) -> list[dict]:
                return [e for e in list(seen) if e["type"] == kind and e.get("name") == PROCESS_CHUNK
                        and job_id in e.get("args", "")]

            (received,) = wait_for(lambda: chunk_task("task-received"), timeout=60, what="task-received")
            wait_for(lambda: [e for e in list(seen) if e["type"] == "task-succeeded"
                              and e["uuid"] == received["uuid"]], timeout=60, what="task-succeeded of the chunk")
            (sent,) = wait_for(lambda: chunk_task("task-sent"), timeout=60, what="task-sent, from the API")
            assert sent["uuid"] == received["uuid"]
            assert received["hostname"].startswith(worker.name)
        finally:
            receiver.should_stop = True
            thread.join(30)
    assert not thread.is_alive()
    app.close()
