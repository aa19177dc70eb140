"""The `predq` command as a user runs it: a subprocess against gunicorn and a Celery worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import joblib
import pandas as pd
import pyarrow.parquet as pq
import pytest
from werkzeug.serving import make_server

from tests.support import data
from tests.support.processes import REPO_ROOT, free_port, wait_for

IDLE_QUEUE = "predq.cli-test-idle"  # no worker consumes it: jobs there stay queued until cancelled


def predq(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREDQ_API_KEY"}
    env.update({"PREDQ_URL": url, "PYTHONPATH": REPO_ROOT})
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, data.Planted]:
    planted = data.planted_csv(6000)
    path = tmp_path_factory.mktemp("cli-input") / "input.csv"
    path.write_bytes(planted.body)
    return path, planted


@pytest.fixture
def idle_url(redis_server, models_dir):
    """The app served in this process, on the session Redis, sending its chunks to a queue no worker reads."""
    from api import create_app

    app = create_app({"REDIS_URL": redis_server.url, "MODELS_DIR": models_dir, "CHUNK_QUEUE": IDLE_QUEUE})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(30)
        server.server_close()
        svc = app.extensions["predq"]
        svc.redis.delete(IDLE_QUEUE)
        svc.redis.close()
        svc.celery.close()


def test_submit_wait_then_status_jobs_results_and_errors(api_server, worker, models_dir, planted, tmp_path):
    """submit --wait prints the job's numbers and writes files that equal the model's own predictions."""
    path, rows = planted
    out_file, err_file = tmp_path / "out.parquet", tmp_path / "errors.jsonl"
    done = predq(api_server.url, "submit", "fussy", str(path), "--id-column", "id", "--chunk-size", "1000",
                 "--wait", "--output", str(out_file), "--errors-output", str(err_file))
    assert done.returncode == 5, done.stderr
    lines = done.stdout.splitlines()
    job_id = lines[0].split()[1]
    assert lines[0] == f"job {job_id} partially_succeeded: 6,000 rows: 5,980 succeeded, 20 failed, 0 skipped"
    assert lines[1].startswith("wall time: ")
    assert lines[2].startswith(f"results: {out_file} (5,980 rows, ")
    assert lines[3].startswith(f"errors: {err_file} (20 rows, ")
    model = joblib.load(Path(models_dir) / "fussy" / "v1" / "model.joblib")
    expected = model.predict(rows.good[["f0", "f1", "f2", "f3", "f4"]])
    results = pq.read_table(out_file).to_pandas()
    assert results["row"].tolist() == rows.good.index.tolist()
    assert results["id"].tolist() == rows.good["id"].tolist()
    assert results["prediction"].tolist() == list(expected)
    errors = [json.loads(line) for line in err_file.read_text().splitlines()]
    assert {e["row"]: e["code"] for e in errors} == rows.errors

    status = predq(api_server.url, "status", job_id)
    assert status.returncode == 0 and "status    partially_succeeded" in status.stdout
    assert "6,000 rows: 5,980 succeeded, 20 failed, 0 skipped (100.0% done)" in status.stdout
    listed = predq(api_server.url, "jobs", "--limit", "5", "--json")
    assert listed.returncode == 0 and job_id in [j["id"] for j in json.loads(listed.stdout)]

    for name in ("again.parquet", "again.jsonl"):
        got = predq(api_server.url, "results", job_id, "-o", str(tmp_path / name))
        assert got.returncode == 0, got.stderr
    assert pq.read_table(tmp_path / "again.parquet").to_pandas().equals(results)
    again = pd.read_json(tmp_path / "again.jsonl", lines=True)
    assert again["row"].tolist() == results["row"].tolist()
    assert again["prediction"].tolist() == results["prediction"].tolist()
    listed_errors = predq(api_server.url, "errors", job_id)
    assert [json.loads(line) for line in listed_errors.stdout.splitlines()] == errors

    finished = predq(api_server.url, "cancel", job_id)
    assert finished.returncode == 1 and finished.stderr.startswith("predq: ") and "already finished" in finished.stderr


def test_models_predict_and_failures(api_server, models_dir):
    """models and predict answer as the service does; an unknown model and a dead server fail cleanly."""
    models = predq(api_server.url, "models")
    assert models.returncode == 0
    assert {"breast_cancer", "diabetes", "fussy"} <= {line.split()[0] for line in models.stdout.splitlines()[1:]}

    row = {"f0": 0.5, "f1": 1.0, "f2": -0.2, "f3": 0.0, "f4": 2.0}
    model = joblib.load(Path(models_dir) / "fussy" / "v1" / "model.joblib")
    one = predq(api_server.url, "predict", "fussy", "--row", json.dumps(row), "--json")
    assert one.returncode == 0 and json.loads(one.stdout)["prediction"] == model.predict(pd.DataFrame([row]))[0]

    unknown = predq(api_server.url, "predict", "nope", "--row", json.dumps(row))
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("predq: No model named 'nope'") and "Traceback" not in unknown.stderr

    down = predq(f"http://127.0.0.1:{free_port()}", "jobs")
    assert down.returncode == 3 and "does not answer" in down.stderr and "Traceback" not in down.stderr


def test_cancel_and_ctrl_c_while_waiting(idle_url, planted, tmp_path):
    """Ctrl-C stops the waiting, not the job, and says how to resume; cancel then ends the job."""
    path, _ = planted
    stderr = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "PREDQ_API_KEY"}
    env.update({"PREDQ_URL": idle_url, "PYTHONPATH": REPO_ROOT})
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "submit", "fussy", str(path), "--wait"],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        wait_for(lambda: " created (6,000 rows" in stderr.read_text(), timeout=60, what="the job to be created")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    said = stderr.read_text()
    assert "Traceback" not in said and "not cancelled" in said, said
    job_id = said.split("predq: job ")[1].split()[0]
    assert f"predq status {job_id} --wait" in said

    still = predq(idle_url, "status", job_id, "--json")
    assert json.loads(still.stdout)["status"] == "queued"
    cancelled = predq(idle_url, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    ended = predq(idle_url, "status", job_id, "--wait")
    assert ended.returncode == 4 and "status    cancelled" in ended.stdout
    assert "6,000 rows: 0 succeeded, 0 failed, 6,000 skipped" in ended.stdout
