"""Operating the service: worker liveness, backpressure, durability and fairness between jobs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from api import create_app
from tests.support import data
from tests.support.processes import REPO_ROOT, ApiServer, CeleryWorker, RedisServer, wait_for

FAST_BEATS = {"HEARTBEAT_INTERVAL": "0.5", "WORKER_STALE_SECONDS": "3"}
ROW = {"f0": 1.0, "f1": 2.0, "f2": 3.0, "f3": 4.0, "f4": 5.0}


@pytest.fixture
def private_redis(tmp_path):
    with RedisServer(appendonly=True, dir=str(tmp_path / "redis")) as server:
        yield server


def _workers_cli(redis_url: str, models_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS_URL": redis_url, "MODELS_DIR": models_dir, **FAST_BEATS}
    return subprocess.run([sys.executable, "-m", "cli.main", "workers"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_worker_that_stops_consuming_is_reported(private_redis, models_dir, tmp_path):
    """readyz?workers=true and `predq workers` tell a consuming worker from one whose pool no longer runs tasks."""
    app = create_app({"REDIS_URL": private_redis.url, "MODELS_DIR": models_dir, **FAST_BEATS})
    client = app.test_client()
    assert client.get("/readyz?workers=true").status_code == 503
    with CeleryWorker(private_redis.url, models_dir=models_dir, env=FAST_BEATS, concurrency=1,
                      log_dir=str(tmp_path / "worker")) as worker:
        ready = wait_for(lambda: client.get("/readyz?workers=true").status_code == 200 and client.get("/readyz"),
                         timeout=60, what="the worker's canary to run")
        (state,) = ready.json["checks"]["workers"]["workers"]
        assert state["status"] == "consuming" and state["name"] == f"{worker.name}@{os.uname().nodename}"
        assert _workers_cli(private_redis.url, models_dir).returncode == 0
        assert f'predq_worker_consuming{{worker="{state["name"]}"}} 1.0' in client.get("/metrics").data.decode()

        children = worker.child_pids()
        for pid in children:
            os.kill(pid, signal.SIGSTOP)  # the process lives and heartbeats, but runs no task
        try:
            wait_for(lambda: client.get("/readyz?workers=true").status_code == 503, timeout=60,
                     what="the stalled worker to be reported")
            body = client.get("/readyz").json
            assert body["status"] == "ready"  # workers are only required when asked
            assert body["checks"]["workers"]["workers"][0]["status"] == "stalled"
            report = _workers_cli(private_redis.url, models_dir)
            assert report.returncode == 1 and "stalled" in report.stdout
            metrics = client.get("/metrics").data.decode()
            assert f'predq_worker_consuming{{worker="{state["name"]}"}} 0.0' in metrics
        finally:
            for pid in children:
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: client.get("/readyz?workers=true").status_code == 200, timeout=60,
                 what="the worker to consume again")


def test_new_jobs_get_503_when_the_store_is_nearly_full(tmp_path, models_dir):
    """Past the memory threshold new jobs are refused with 503 store_full and Retry-After; after clean-up they run."""
    with RedisServer(maxmemory="64mb", dir=str(tmp_path / "redis")) as server:
        app = create_app({"REDIS_URL": server.url, "MODELS_DIR": models_dir, "STORE_FULL_FRACTION": 0.5})
        client = app.test_client()
        r = server.client()
        for i in range(40):
            r.set(f"ballast:{i}", b"x" * (1 << 20))
        refused = wait_for(lambda: (resp := client.post("/v1/jobs", json={"model": "fussy", "rows": [ROW]}))
                           .status_code == 503 and resp, timeout=30, what="the store to be reported full")
        assert refused.json["error"]["code"] == "store_full" and int(refused.headers["Retry-After"]) > 0
        assert r.zcard("predq:jobs") == 0
        r.delete(*[f"ballast:{i}" for i in range(40)])
        wait_for(lambda: client.post("/v1/jobs", json={"model": "fussy", "rows": [ROW]}).status_code == 202,
                 timeout=30, what="jobs to be accepted again")


def test_job_creation_waits_for_the_append_only_file(private_redis, models_dir, tmp_path, caplog):
    """With an append-only file and WAITAOF, creation waits for it; without the file, the log says what is at risk."""
    app = create_app({"REDIS_URL": private_redis.url, "MODELS_DIR": models_dir})
    assert app.test_client().post("/v1/jobs", json={"model": "fussy", "rows": [ROW]}).status_code == 202
    assert app.extensions["predq"].durability.mode == "waitaof"
    with RedisServer(appendonly=False, dir=str(tmp_path / "volatile")) as volatile:
        app = create_app({"REDIS_URL": volatile.url, "MODELS_DIR": models_dir})
        assert app.test_client().post("/v1/jobs", json={"model": "fussy", "rows": [ROW]}).status_code == 202
        assert app.extensions["predq"].durability.mode == "none"
        assert "without an append-only file" in caplog.text


def test_a_small_job_is_not_stuck_behind_a_large_one(client, worker):
    """A 1,000-row job sent after a 200,000-row job finishes while the large one is still running."""
    large = data.planted_csv(200_000)
    body, content_type = data.multipart({"model": "fussy", "chunk_size": "500"}, large.filename, large.body)
    big = client.post("/v1/jobs", data=body, content_type=content_type).json
    small = client.post("/v1/jobs", json={"model": "fussy", "rows": [ROW] * 1000}).json

    def finished(job_id):
        job = client.get(f"/v1/jobs/{job_id}").json
        return job if job["status"] not in ("queued", "running") else None

    small_done = wait_for(lambda: finished(small["id"]), timeout=120, what="the small job")
    big_now = client.get(f"/v1/jobs/{big['id']}").json
    assert small_done["status"] == "succeeded"
    assert big_now["status"] == "running", "the large job should still be running when the small one is done"
    assert big_now["counts"]["succeeded"] + big_now["counts"]["failed"] < 200_000
    wait_for(lambda: finished(big["id"]), timeout=300, what="the large job")


class _ReusePortApiServer(ApiServer):
    """The API as the Procfile runs it, with --reuse-port, on a port chosen by the test."""

    def __init__(self, *args, port: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if port is not None:
            self.port = port

    def command(self) -> list[str]:
        command = super().command()
        return [*command[:-1], "--reuse-port", command[-1]]

    def launch(self) -> None:
        """Start without waiting for /healthz: on a shared port, another server may be the one to answer it."""
        self._launch(self.command(), env=self.environment(), cwd=self.cwd)


def test_a_second_server_on_a_taken_port_refuses_to_start(private_redis, models_dir, tmp_path):
    """With --reuse-port the kernel would let a second server share the port: it stops, naming the port."""
    first = _ReusePortApiServer(private_redis.url, models_dir=models_dir, log_dir=str(tmp_path / "first"))
    second = _ReusePortApiServer(private_redis.url, models_dir=models_dir, log_dir=str(tmp_path / "second"),
                                 port=first.port)
    try:
        first.start()
        second.launch()
        wait_for(lambda: not second.running, timeout=60, what="the second server to exit")
        assert second.returncode == 1
        assert f"127.0.0.1:{first.port} is already in use by another server" in second.log()
        assert first.running
    finally:
        second.cleanup()
        first.cleanup()
