"""Faults: killed pool children and workers, duplicate and lost messages, a dead API, a Redis restart.

Each test starts its own Redis-compatible server (append-only), its own Celery workers (and a beat process
where the reconciler is needed) and builds the API in-process against them, with timeouts of a few seconds.
"""
from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
import requests

from shared import keys
from shared.dispatch import make_celery, send_chunk
from shared.registry import Registry
from shared.settings import load_settings
from tests.support import data
from tests.support.models import FEATURES, POISON, PREDICT_SLEEP_ENV, install_fault_models, training_frame
from tests.support.processes import REPO_ROOT, ApiServer, CeleryWorker, RedisServer, _app_env, _ManagedProcess, wait_for

TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}

#: Settings for every process of a test (workers, beat, the app): failures are noticed within seconds.
FAST = {
    "VISIBILITY_TIMEOUT": "4",
    "UNACKED_RESTORE_INTERVAL": "1",
    "CHUNK_TIME_LIMIT": "20",
    "CHUNK_SOFT_TIME_LIMIT": "15",
    "STALE_CHUNK_SECONDS": "5",
    "RECONCILE_INTERVAL": "1",
    "HEARTBEAT_INTERVAL": "1",
    "MAX_CHUNK_ATTEMPTS": "3",
    "MODEL_RESCAN_SECONDS": "2",
}

pytestmark = pytest.mark.timeout(240)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


class BeatProcess(_ManagedProcess):
    """A real `celery -A worker.app beat` (the reconciler's scheduler) in its own process group."""

    kind = "celery-beat"

    def __init__(self, redis_url: str, *, models_dir: str, env: dict[str, str], log_dir: str) -> None:
        super().__init__(log_dir, "beat.log")
        self.redis_url = redis_url
        self.models_dir = models_dir
        self.extra_env = dict(env)
        self.schedule = str(Path(log_dir) / "beat-schedule")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO",
                "--schedule", self.schedule]

    def start(self) -> BeatProcess:
        self._launch(self.command(), env=_app_env(self.redis_url, self.models_dir, self.extra_env), cwd=REPO_ROOT)
        self._wait_ready(lambda: "beat: Starting..." in self._current_log(), timeout=60,
                         what="celery beat to log 'beat: Starting...'")
        return self


class Rig:
    """One test's own server, workers, beat, gunicorn and in-process app; all stopped at the end."""

    def __init__(self, tmp_path: Path, models_dir: str) -> None:
        self.tmp = tmp_path
        self.models_dir = models_dir
        self.redis = RedisServer(appendonly=True, dir=str(tmp_path / "redis"))
        self.redis.start()
        self.r = self.redis.client()
        self.procs: list[_ManagedProcess] = []
        self._count = 0

    def _log_dir(self, kind: str) -> str:
        self._count += 1
        path = self.tmp / f"{self._count:02d}-{kind}"
        path.mkdir()
        return str(path)

    def worker(self, *, concurrency: int = 1, sleep: float = 0.0, start: bool = True, **env: str) -> CeleryWorker:
        proc = CeleryWorker(self.redis.url, models_dir=self.models_dir, concurrency=concurrency,
                            env={**FAST, PREDICT_SLEEP_ENV: str(sleep), **env}, log_dir=self._log_dir("worker"))
        self.procs.append(proc)
        if start:
            proc.start()
        return proc

    def beat(self) -> BeatProcess:
        proc = BeatProcess(self.redis.url, models_dir=self.models_dir, env=FAST, log_dir=self._log_dir("beat"))
        self.procs.append(proc)
        return proc.start()

    def api_server(self) -> ApiServer:
        proc = ApiServer(self.redis.url, models_dir=self.models_dir, env=FAST, log_dir=self._log_dir("api"))
        self.procs.append(proc)
        return proc.start()

    def settings(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis.url, "MODELS_DIR": self.models_dir, **FAST}

    def client(self):
        from api import create_app

        return create_app(self.settings()).test_client()

    def close(self) -> None:
        """SIGKILL every process group: the test is over, and a graceful stop would wait for running chunks."""
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.kill(signal.SIGKILL)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(exc)
        self.r.close()
        self.redis.kill(signal.SIGKILL)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def fault_models_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fault-models")
    install_fault_models(path)
    return str(path)


@pytest.fixture
def rig(tmp_path: Path, fault_models_dir: str):
    print(f"process logs under {tmp_path}")
    rig = Rig(tmp_path, fault_models_dir)
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="module")
def slow_reg(fault_models_dir):
    return Registry(fault_models_dir).get("slow_reg")


@pytest.fixture(scope="module")
def poison_reg(fault_models_dir):
    return Registry(fault_models_dir).get("poison_reg")


# --------------------------------------------------------------------------
# Jobs, logs and exact answers
# --------------------------------------------------------------------------


def make_frame(n: int, seed: int = 21) -> pd.DataFrame:
    frame = training_frame(n, seed)
    frame.insert(0, "id", [f"r{i}" for i in range(n)])
    return frame


def submit(client, model: str, frame: pd.DataFrame, chunk_size: int) -> str:
    body = {"model": model, "rows": frame.to_dict(orient="records"), "id_column": "id", "chunk_size": chunk_size}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.json
    assert response.json["counts"]["total"] == len(frame)
    return response.json["id"]


def record_attempts(r, job_id: str, seen: dict[int, int]) -> None:
    """Fold the job's per-chunk claim counters into `seen` (they are deleted when the job finishes)."""
    for k, v in r.hgetall(keys.attempts(job_id)).items():
        seen[int(k)] = max(seen.get(int(k), 0), int(v))


def wait_terminal(client, job_id: str, *, timeout: float = 90, r=None, attempts: dict | None = None) -> dict:
    def done():
        if attempts is not None:
            record_attempts(r, job_id, attempts)
        job = client.get(f"/v1/jobs/{job_id}").json
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")


def jsonl(response) -> list[dict]:
    assert response.status_code == 200, response.data[:300]
    return [orjson.loads(line) for line in response.data.splitlines() if line]


def assert_predictions(results: list[dict], frame: pd.DataFrame, model) -> None:
    rows = [r["row"] for r in results]
    assert [r["id"] for r in results] == frame.loc[rows, "id"].tolist()
    if not rows:
        return
    expected = model.estimator.predict(frame.loc[rows, FEATURES])
    np.testing.assert_allclose([r["prediction"] for r in results], expected, rtol=1e-12, atol=1e-12)


def assert_exact(client, job: dict, frame: pd.DataFrame, model, *, failed: dict[int, str] | None = None,
                 status: str = "succeeded") -> tuple[list[dict], list[dict]]:
    """Status and counts exact; every good row predicted exactly once; errors name exactly the failed rows."""
    failed = failed or {}
    n = len(frame)
    assert job["status"] == status, job
    assert job["counts"] == {"total": n, "succeeded": n - len(failed), "failed": len(failed), "skipped": 0}, job
    counts = job["counts"]
    assert counts["succeeded"] + counts["failed"] + counts["skipped"] == counts["total"]
    results = jsonl(client.get(f"/v1/jobs/{job['id']}/results"))
    rows = [r["row"] for r in results]
    duplicated = [row for row, k in Counter(rows).items() if k > 1]
    assert not duplicated, f"rows in the results more than once: {duplicated[:20]}"
    good = frame.drop(index=sorted(failed))
    assert rows == good.index.tolist()
    assert_predictions(results, frame, model)
    errors = jsonl(client.get(f"/v1/jobs/{job['id']}/errors"))
    assert [e["row"] for e in errors] == sorted(failed)
    assert {e["row"]: e["code"] for e in errors} == failed
    return results, errors


def log_records(proc: _ManagedProcess) -> list[dict]:
    """The JSON log lines of a process (all its runs)."""
    records = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return records


def chunk_outcomes(proc: _ManagedProcess, job_id: str) -> list[tuple[int, str]]:
    """(chunk, outcome) of every chunk task the process finished for the job, in order."""
    return [(rec["chunk"], rec["outcome"]) for rec in log_records(proc)
            if rec.get("message") == "chunk committed" and rec.get("job_id") == job_id]


def fresh_claims(r, job_id: str, within: float) -> list[int]:
    """Chunks claimed less than `within` seconds ago and not committed yet: running in a worker now."""
    now = time.time()
    return sorted(int(k) for k, v in r.hgetall(keys.running(job_id)).items() if now - float(v) < within)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_pool_child_killed_mid_chunk(rig, slow_reg):
    """A pool child SIGKILLed while it runs a chunk: the chunk runs again and the job succeeds exactly."""
    worker = rig.worker(concurrency=2, sleep=1.5)
    client = rig.client()
    frame = make_frame(1600)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 16 chunks
    wait_for(lambda: len(fresh_claims(rig.r, job_id, 1.2)) == 2, timeout=30,
             what="both pool children to be mid-chunk")
    worker.kill_child()
    attempts: dict[int, int] = {}
    job = wait_terminal(client, job_id, r=rig.r, attempts=attempts)
    assert_exact(client, job, frame, slow_reg)
    assert "WorkerLostError" in worker.log(), worker.log_tail()
    # Exactly one chunk (the killed child's) was claimed twice; every other chunk once.
    assert sorted(attempts) == list(range(16)) and sorted(attempts.values()) == [1] * 15 + [2], attempts


def test_worker_group_killed_then_new_worker(rig, slow_reg):
    """A whole worker SIGKILLed mid-job: a new worker (and the reconciler) finish the job exactly."""
    first = rig.worker(concurrency=2, sleep=1.5)
    rig.beat()
    client = rig.client()
    frame = make_frame(1400)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 14 chunks
    wait_for(lambda: rig.r.scard(keys.done(job_id)) >= 2 and len(fresh_claims(rig.r, job_id, 1.2)) == 2,
             timeout=30, what="two chunks committed and two more just claimed")
    first.kill(signal.SIGKILL)
    in_flight = {int(k) for k in rig.r.hkeys(keys.running(job_id))} - {int(k) for k in rig.r.smembers(keys.done(job_id))}
    assert len(in_flight) == 2
    attempts: dict[int, int] = {}
    record_attempts(rig.r, job_id, attempts)
    second = rig.worker(concurrency=2, sleep=1.5)
    job = wait_terminal(client, job_id, r=rig.r, attempts=attempts)
    assert_exact(client, job, frame, slow_reg)
    for index in in_flight:  # claimed by the killed worker, then again after its message came back
        assert attempts[index] >= 2, (index, attempts)
    redone = {c for c, outcome in chunk_outcomes(second, job_id) if outcome not in ("done", "duplicate", "gone")}
    assert in_flight <= redone


def test_duplicate_delivery_of_committed_chunk_changes_nothing(rig, slow_reg):
    """A committed chunk delivered again, mid-job or after the job finished, changes no count, row or time."""
    client = rig.client()
    frame = make_frame(400)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 4 chunks, sent while no worker runs
    assert rig.r.llen("predq.chunks") == 4
    # Replace the queue's messages by hand: chunk 0, chunk 0 again, then the rest.
    rig.r.delete("predq.chunks")
    celery = make_celery(load_settings(rig.settings()))
    for index in (0, 0, 1, 2, 3):
        send_chunk(celery, job_id, index)
    worker = rig.worker(concurrency=1)
    job = wait_terminal(client, job_id)
    results, errors = assert_exact(client, job, frame, slow_reg)
    # The second delivery of chunk 0 came while chunks 1-3 were still to run, and was dropped.
    assert chunk_outcomes(worker, job_id) == [(0, "open"), (0, "done"), (1, "open"), (2, "open"), (3, "succeeded")]

    before = client.get(f"/v1/jobs/{job_id}").json
    raw_results = client.get(f"/v1/jobs/{job_id}/results").data
    raw_errors = client.get(f"/v1/jobs/{job_id}/errors").data
    for index in range(4):
        send_chunk(celery, job_id, index)
    wait_for(lambda: len(chunk_outcomes(worker, job_id)) == 9, timeout=30,
             what="the worker to take the four duplicate messages")
    assert chunk_outcomes(worker, job_id)[5:] == [(0, "done"), (1, "done"), (2, "done"), (3, "done")]
    after = client.get(f"/v1/jobs/{job_id}").json
    for field in ("status", "counts", "created_at", "started_at", "finished_at", "progress", "error"):
        assert after[field] == before[field], field
    assert client.get(f"/v1/jobs/{job_id}/results").data == raw_results
    assert client.get(f"/v1/jobs/{job_id}/errors").data == raw_errors
    assert len(results) == 400 and errors == []
    assert rig.r.hlen(keys.attempts(job_id)) == 0 and rig.r.hlen(keys.running(job_id)) == 0


def test_visibility_timeout_redelivers_running_chunk(rig, slow_reg):
    """A chunk that outlives the visibility timeout runs twice at once, and still counts once."""
    # Each redelivery is a claim; allow enough of them that this one is not taken for a poison chunk.
    slow = {"VISIBILITY_TIMEOUT": "2", "UNACKED_RESTORE_INTERVAL": "1", "MAX_CHUNK_ATTEMPTS": "20"}
    workers = [rig.worker(concurrency=2, sleep=6, **slow) for _ in range(2)]
    client = rig.client()
    frame = make_frame(200)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 2 chunks, 4 pool processes
    attempts: dict[int, int] = {}
    job = wait_terminal(client, job_id, r=rig.r, attempts=attempts)
    assert_exact(client, job, frame, slow_reg)
    assert max(attempts.values()) >= 2, attempts
    received = Counter(rec["message"].split("[", 1)[1].split("]", 1)[0]
                       for w in workers for rec in log_records(w)
                       if rec.get("message", "").startswith("Task predq.process_chunk[")
                       and rec["message"].endswith("received"))
    assert len(received) == 2 and max(received.values()) >= 2, received
    committed = [o for w in workers for o in chunk_outcomes(w, job_id)]
    assert sorted(c for c, o in committed if o not in ("duplicate", "done")) == [0, 1], committed


def test_poison_chunk_fails_its_rows_after_max_attempts(rig, poison_reg):
    """A chunk that kills its worker every time: its rows fail as chunk_failed, the others succeed."""
    worker = rig.worker(concurrency=2)
    client = rig.client()
    frame = make_frame(200)
    frame.loc[125, "f2"] = POISON  # chunk 2 of 4
    job_id = submit(client, "poison_reg", frame, chunk_size=50)
    only = make_frame(30, seed=22)
    only.loc[7, "f0"] = POISON
    only_id = submit(client, "poison_reg", only, chunk_size=50)

    job = wait_terminal(client, job_id)
    _, errors = assert_exact(client, job, frame, poison_reg, failed={row: "chunk_failed" for row in range(100, 150)},
                             status="partially_succeeded")
    for e in errors:
        assert e["id"] == f"r{e['row']}"
        assert e["message"] == "the chunk could not be processed after 3 attempts"
    assert job["error"] is None

    alone = wait_terminal(client, only_id)
    _, errors = assert_exact(client, alone, only, poison_reg, failed={row: "chunk_failed" for row in range(30)},
                             status="failed")
    assert alone["error"]["code"] == "all_rows_failed"
    assert {e["message"] for e in errors} == {"the chunk could not be processed after 3 attempts"}
    # Three deliveries of each poison chunk killed a pool child; the fourth failed its rows instead.
    assert worker.log().count("exited with 'signal 9 (SIGKILL)'") == 6, worker.log_tail(80)


def test_lost_messages_are_resent_by_the_reconciler(rig, slow_reg):
    """Chunk messages lost from the broker: the reconciler sends them again and the job completes exactly."""
    client = rig.client()
    frame = make_frame(600)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 6 chunks, sent while no worker runs
    names = {k.decode() for k in rig.r.keys("*")}
    assert "predq.chunks" in names and rig.r.llen("predq.chunks") == 6, names
    rig.r.delete("predq.chunks")
    worker = rig.worker(concurrency=2)
    rig.beat()
    job = wait_terminal(client, job_id)
    assert_exact(client, job, frame, slow_reg)
    resent = {rec["chunk"] for rec in log_records(worker)
              if rec.get("message") == "re-sending a stale chunk" and rec.get("job_id") == job_id}
    assert resent == set(range(6))


def test_api_killed_mid_upload_fails_the_job(rig, slow_reg):
    """The API dies while a file is uploading: the job fails with internal_error and accounts for every row read."""
    api = rig.api_server()
    worker = rig.worker(concurrency=1)
    frame = make_frame(100_000)
    body = frame.to_csv(index=False, float_format="%.17g").encode()
    first_part = body.index(b"\n", 6 << 20) + 1  # enough for the reader to parse its first blocks of CSV
    killed = []

    def pause() -> None:
        def committed():
            ids = rig.r.zrange(keys.JOBS, 0, -1)
            return len(ids) == 1 and rig.r.scard(keys.done(ids[0].decode())) >= 1

        wait_for(committed, timeout=30, what="the first chunk of the upload to be stored and committed")
        api.kill(signal.SIGKILL)
        killed.append(True)

    stream, content_type = data.paused_multipart({"model": "slow_reg", "chunk_size": "5000", "id_column": "id"},
                                                 "rows.csv", body, first_part, pause)
    with pytest.raises(requests.RequestException):
        requests.post(f"{api.url}/v1/jobs", data=stream, timeout=60, headers={"Content-Type": content_type})
    assert killed
    (job_id,) = [i.decode() for i in rig.r.zrange(keys.JOBS, 0, -1)]
    rig.beat()
    client = rig.client()
    job = wait_terminal(client, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "internal_error", job
    counts = job["counts"]
    rows_read = int(rig.r.hget(keys.job(job_id), "rows_read"))
    assert 5000 <= rows_read < len(frame) and rows_read % 5000 == 0
    assert counts["total"] == rows_read
    assert counts["succeeded"] + counts["failed"] + counts["skipped"] == counts["total"]
    assert counts["failed"] == 0 and counts["succeeded"] >= 5000
    assert any(rec.get("message") == "job input stopped arriving; failing the job" and rec.get("job_id") == job_id
               for rec in log_records(worker))
    results = jsonl(client.get(f"/v1/jobs/{job_id}/results"))
    rows = [r["row"] for r in results]
    assert len(rows) == len(set(rows)) == counts["succeeded"]
    assert rows == sorted(rows) and all(row < rows_read for row in rows)
    assert_predictions(results, frame, slow_reg)
    assert jsonl(client.get(f"/v1/jobs/{job_id}/errors")) == []


def test_redis_restart_mid_job(rig, slow_reg):
    """Redis killed mid-job and restarted from its append-only file: /readyz says so, and jobs complete exactly."""
    worker = rig.worker(concurrency=2, sleep=1.0)
    beat = rig.beat()
    client = rig.client()
    frame = make_frame(1200)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 12 chunks
    wait_for(lambda: rig.r.scard(keys.done(job_id)) >= 2, timeout=30, what="two chunks committed")

    rig.redis.kill(signal.SIGKILL)
    started = time.monotonic()
    down = client.get("/readyz")
    elapsed = time.monotonic() - started
    assert down.status_code == 503, down.json
    assert down.json["checks"]["redis"]["ok"] is False, down.json
    assert elapsed < 5, f"/readyz took {elapsed:.1f} s while Redis was down"

    rig.redis.restart()
    restarted_at = time.time()
    rig.r = rig.redis.client()
    scheduled = beat.log().count("Sending due task reconcile")
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30, what="/readyz to answer 200 again")

    def fresh_heartbeat():
        beats = {k.decode(): float(v) for k, v in rig.r.hgetall(keys.WORKERS).items()}
        return [name for name, at in beats.items() if name.startswith(f"{worker.name}@") and at > restarted_at]

    wait_for(fresh_heartbeat, timeout=30, what="a worker heartbeat newer than the restart")
    wait_for(lambda: client.get("/readyz?workers=true").status_code == 200, timeout=30,
             what="/readyz?workers=true to see a consuming worker again")
    job = wait_terminal(client, job_id)
    assert_exact(client, job, frame, slow_reg)

    later = make_frame(300, seed=23)
    later_id = submit(client, "slow_reg", later, chunk_size=100)
    assert_exact(client, wait_terminal(client, later_id), later, slow_reg)
    # The reconciler's schedule carries on too.
    wait_for(lambda: beat.log().count("Sending due task reconcile") > scheduled, timeout=30,
             what="beat to schedule the reconciler after the restart")
    assert beat.running and worker.running


def test_sigterm_lets_the_running_chunk_finish(rig, slow_reg):
    """SIGTERM to a worker mid-chunk: that chunk finishes and commits once; another worker does the rest."""
    first = rig.worker(concurrency=1, sleep=4)
    client = rig.client()
    frame = make_frame(300)
    job_id = submit(client, "slow_reg", frame, chunk_size=100)  # 3 chunks
    (running,) = wait_for(lambda: fresh_claims(rig.r, job_id, 1.0), timeout=30, what="a chunk to be claimed")
    first.send_signal(signal.SIGTERM)
    assert first.wait_exit(timeout=30) == 0  # a warm shutdown, after the chunk
    first.stop()
    assert [int(i) for i in rig.r.smembers(keys.done(job_id))] == [running]
    assert rig.r.hgetall(keys.attempts(job_id)) == {str(running).encode(): b"1"}
    assert chunk_outcomes(first, job_id) == [(running, "open")]
    attempts: dict[int, int] = {}
    rig.worker(concurrency=1, sleep=4)
    job = wait_terminal(client, job_id, r=rig.r, attempts=attempts)
    assert_exact(client, job, frame, slow_reg)
    assert all(v == 1 for v in attempts.values()), attempts
