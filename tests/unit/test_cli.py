"""The `predq` command and its Python client against the real app, served in-process on fakeredis.

Chunk messages go to an outbox instead of a broker; the test decides when they are processed (at once, or
one per status poll), with the same `process_chunk` the workers run.
"""
from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import joblib
import pandas as pd
import pyarrow.parquet as pq
import pytest
from werkzeug.serving import make_server

from cli.client import ApiError, Client, ServerUnreachable
from cli.main import main as predq
from shared.auth import new_key
from shared.chunk import process_chunk
from shared.idempotency import IdempotencyKeys
from shared.jobs import JobStore
from tests.support import data
from tests.support.models import install_test_models
from tests.support.processes import free_port

KEY, KEY_ENTRY = new_key("cli-tests", ["jobs", "predict"])


class Outbox:
    """Stands in for the broker: keeps chunk messages, or processes each at once when `auto` is set."""

    def __init__(self) -> None:
        self.messages: queue.Queue[tuple[str, int]] = queue.Queue()
        self.auto = True
        self.svc = None

    def send_task(self, name: str, args: list) -> None:
        self.messages.put((args[0], args[1]))
        if self.auto:
            self.work()

    def work(self, limit: int | None = None) -> int:
        """Process waiting chunks as a worker would; how many."""
        done = 0
        while limit is None or done < limit:
            try:
                job_id, index = self.messages.get_nowait()
            except queue.Empty:
                break
            process_chunk(self.svc.store, self.svc.registry, job_id, index, lambda j, i: None)
            done += 1
        return done


class Service:
    def __init__(self, url: str, outbox: Outbox, models_dir: Path):
        self.url, self.outbox, self.models_dir = url, outbox, models_dir

    def client(self) -> Client:
        return Client(self.url, KEY)

    def cli(self, capsys, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = predq(["--url", self.url, "--api-key", KEY, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    from api import create_app

    root = tmp_path_factory.mktemp("cli")
    models = root / "models"
    install_test_models(models)
    (root / "keys.json").write_text(json.dumps({"keys": [KEY_ENTRY]}))
    app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "MODELS_DIR": str(models),
                      "MODEL_RESCAN_SECONDS": 0, "API_KEYS_FILE": str(root / "keys.json"),
                      "RATE_LIMIT_PER_MINUTE": 0})
    svc = app.extensions["predq"]
    fake = fakeredis.FakeRedis()
    svc.redis = fake
    svc.store = JobStore(fake, result_ttl=3600, max_attempts=3, stale_after=600)
    svc.idempotency = IdempotencyKeys(fake, lease_seconds=60, ttl=3600)
    svc.durability.mode = "none"
    svc.capacity = type("NoLimit", (), {"check": lambda self: None})()  # fakeredis has no INFO
    outbox = Outbox()
    outbox.svc = svc
    svc.celery = outbox
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Service(f"http://127.0.0.1:{server.server_port}", outbox, models)
    finally:
        server.shutdown()
        thread.join(30)
        server.server_close()


@pytest.fixture
def outbox(service) -> Iterator[Outbox]:
    service.outbox.auto = True
    yield service.outbox
    service.outbox.work()
    service.outbox.auto = True


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, data.Planted]:
    """5,000 rows for the `fussy` model, 20 of them bad."""
    planted = data.planted_csv(5000)
    path = tmp_path_factory.mktemp("input") / "input.csv"
    path.write_bytes(planted.body)
    return path, planted


def expected_predictions(models_dir: Path, planted: data.Planted) -> list[str]:
    model = joblib.load(models_dir / "fussy" / "v1" / "model.joblib")
    return [str(p) for p in model.predict(planted.good[["f0", "f1", "f2", "f3", "f4"]])]


# -- the client --------------------------------------------------------------------------------------

def test_client_lists_models_and_predicts_like_the_model(service, outbox):
    """models() names every deployed model; predict() answers as the model does, with per-row errors."""
    client = service.client()
    assert [m["name"] for m in client.models()] == ["fussy", "fussy_reg"]
    row = {"f0": 0.5, "f1": 1.0, "f2": -0.2, "f3": 0.0, "f4": 2.0}
    model = joblib.load(service.models_dir / "fussy" / "v1" / "model.joblib")
    one = client.predict("fussy", row, probabilities=True)
    assert one["prediction"] == model.predict(pd.DataFrame([row]))[0]
    assert set(one["probabilities"]) == {"no", "yes"}
    many = client.predict("fussy", [row, {"f0": "abc"}])
    assert many["predictions"][0] == one["prediction"] and many["predictions"][1] is None
    assert [e["row"] for e in many["errors"]] == [1]
    job = client.wait(client.submit_rows("fussy", [row, row], id_column=None)["id"])
    assert job["counts"] == {"total": 2, "succeeded": 2, "failed": 0, "skipped": 0}


def test_client_errors_carry_the_status_code_and_message(service, tmp_path):
    """Every error answer raises ApiError with the service's status, code and message."""
    client = service.client()
    with pytest.raises(ApiError) as unknown:
        client.predict("nope", {"f0": 1})
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    assert "No model named 'nope'" in unknown.value.message
    with pytest.raises(ApiError) as missing_job:
        client.status("job_nope")
    assert (missing_job.value.status, missing_job.value.code) == (404, "job_not_found")
    with pytest.raises(ApiError) as no_key:
        Client(service.url, api_key="").models()
    assert no_key.value.status == 401
    csv = tmp_path / "rows.csv"
    csv.write_text("f0,f1\n1,2\n")
    with pytest.raises(ApiError) as columns:
        client.submit(csv, "fussy")
    assert (columns.value.status, columns.value.code) == (422, "missing_columns")
    assert "f2" in columns.value.message
    with pytest.raises(ServerUnreachable) as down:
        Client(f"http://127.0.0.1:{free_port()}", KEY).models()
    assert down.value.status == 0 and "does not answer" in down.value.message


class RecordingFile(io.BytesIO):
    """A file object that records how much each read asked for."""

    def __init__(self, body: bytes, name: str):
        super().__init__(body)
        self.name = name
        self.reads: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.reads.append(-1 if size is None else size)
        return super().read(size)


def test_submit_streams_the_file_in_blocks(service, outbox):
    """The upload reads the file in bounded blocks (never whole), reports its progress, and makes the job."""
    planted = data.planted_csv(30_000)
    file = RecordingFile(planted.body, "big.csv")
    seen: list[tuple[int, int]] = []
    job = service.client().submit(file, "fussy", id_column="id",
                                  on_upload=lambda sent, total: seen.append((sent, total)))
    assert job["counts"]["total"] == 30_000
    assert len(file.reads) > 10 and all(0 < n <= 1 << 20 for n in file.reads), file.reads[:5]
    assert seen[-1][0] == seen[-1][1] > len(planted.body)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_wait_reports_progress_then_results_and_errors_download(service, outbox, planted, tmp_path):
    """wait() polls until the job ends, showing each step; results and errors come back in every format."""
    path, rows = planted
    outbox.auto = False
    client = service.client()
    job = client.submit(path, "fussy", id_column="id", options={"chunk_size": 1000})
    assert job["status"] == "queued" and outbox.messages.qsize() == 5
    polls: list[dict] = []

    def one_chunk_per_poll(current: dict) -> None:
        polls.append(current)
        outbox.work(limit=1)

    done = client.wait(job["id"], on_progress=one_chunk_per_poll, interval=0.1)
    assert done["status"] == "partially_succeeded"
    assert done["counts"] == {"total": 5000, "succeeded": 4980, "failed": 20, "skipped": 0}
    finished = [p["counts"]["succeeded"] + p["counts"]["failed"] for p in polls]
    assert finished == sorted(finished) and finished[0] == 0 and len(set(finished)) >= 5

    assert client.results(job["id"], tmp_path / "r.parquet") > 0
    table = pq.read_table(tmp_path / "r.parquet").to_pandas()
    assert table["row"].tolist() == rows.good.index.tolist()
    assert table["id"].tolist() == rows.good["id"].tolist()
    assert table["prediction"].astype(str).tolist() == expected_predictions(service.models_dir, rows)
    client.results(job["id"], tmp_path / "r.jsonl")
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"] for line in lines] == table["row"].tolist()
    client.results(job["id"], tmp_path / "r.csv")
    assert pd.read_csv(tmp_path / "r.csv")["row"].tolist() == table["row"].tolist()
    errors = client.errors(job["id"])
    assert {e["row"]: e["code"] for e in errors} == rows.errors
    with pytest.raises(ValueError, match="format"):
        client.results(job["id"], tmp_path / "r.txt")
    assert [j["id"] for j in client.iter_jobs(page_size=2)] == [j["id"] for j in client.jobs(limit=100)]
    assert not list(tmp_path.glob(".*.part"))


# -- the command -------------------------------------------------------------------------------------

def test_help_documents_every_command_and_the_exit_codes(capsys):
    assert predq(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("up", "models", "predict", "submit", "status", "jobs", "results", "errors", "cancel",
                    "schedules", "run-schedule", "workers", "new-key"):
        assert f"  {command} " in out, command
    assert "Exit codes:" in out and "130" in out and "partially_succeeded" in out


def test_submit_wait_prints_a_summary_and_writes_the_outputs(service, capsys, outbox, planted, tmp_path):
    """A job with bad rows exits 5; the summary's numbers and both files agree with the input."""
    path, rows = planted
    out_file, err_file = tmp_path / "out.parquet", tmp_path / "errors.csv"
    code, out, err = service.cli(capsys, "submit", "fussy", str(path), "--id-column", "id", "--wait",
                                 "--output", str(out_file), "--errors-output", str(err_file))
    assert code == 5, err
    lines = out.splitlines()
    assert lines[0].endswith("partially_succeeded: 5,000 rows: 4,980 succeeded, 20 failed, 0 skipped"), out
    assert lines[0].startswith("job job_")
    assert any(line.startswith("wall time: ") for line in lines)
    assert f"results: {out_file} (4,980 rows, " in out and f"errors: {err_file} (20 rows, " in out
    assert "Traceback" not in err
    results = pq.read_table(out_file).to_pandas()
    assert results["prediction"].astype(str).tolist() == expected_predictions(service.models_dir, rows)
    assert dict(zip(*pd.read_csv(err_file)[["row", "code"]].to_dict("list").values())) == rows.errors


def test_submit_of_clean_rows_exits_0_and_without_wait_prints_the_id(service, capsys, outbox, planted, tmp_path):
    _, rows = planted
    clean = tmp_path / "clean.jsonl"
    rows.good.head(300).to_json(clean, orient="records", lines=True)
    code, out, _ = service.cli(capsys, "submit", "fussy", str(clean), "-o", str(tmp_path / "r.jsonl"))
    assert code == 0 and " succeeded: 300 rows: 300 succeeded, 0 failed, 0 skipped" in out
    assert "errors: none" in out
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 300

    code, out, err = service.cli(capsys, "submit", "fussy", str(clean))
    assert code == 0 and out.strip().startswith("job_") and len(out.split()) == 1
    assert f"predq status {out.strip()} --wait" in err
    code, out, _ = service.cli(capsys, "submit", "fussy", str(clean), "--json", "--metadata", "team=a")
    assert code == 0 and json.loads(out)["metadata"] == {"team": "a"}
    unnamed = tmp_path / "rows.data"
    unnamed.write_bytes(clean.read_bytes())
    code, _, err = service.cli(capsys, "submit", "fussy", str(unnamed))
    assert code == 2 and "cannot tell the format" in err
    code, out, _ = service.cli(capsys, "submit", "fussy", str(unnamed), "--format", "jsonl", "--json")
    assert code == 0 and json.loads(out)["counts"]["total"] == 300


def test_status_jobs_results_errors_and_cancel(service, capsys, outbox, planted, tmp_path):
    path, rows = planted
    job_id = service.client().submit(path, "fussy", id_column="id")["id"]

    code, out, _ = service.cli(capsys, "status", job_id)
    assert code == 0 and f"job       {job_id}" in out and "status    partially_succeeded" in out
    assert "5,000 rows: 4,980 succeeded, 20 failed" in out
    code, out, _ = service.cli(capsys, "status", job_id, "--wait", "--json")
    assert code == 5 and json.loads(out)["id"] == job_id

    code, out, _ = service.cli(capsys, "jobs", "--limit", "1", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [job_id]
    code, out, _ = service.cli(capsys, "jobs", "--status", "partially_succeeded")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["job", "status"]
    assert any(line.startswith(job_id) for line in out.splitlines())

    code, out, _ = service.cli(capsys, "results", job_id, "-o", str(tmp_path / "r.parquet"))
    assert code == 0 and str(tmp_path / "r.parquet") in out
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 4980
    code, out, _ = service.cli(capsys, "results", job_id)
    assert [json.loads(line)["row"] for line in out.splitlines()] == rows.good.index.tolist()
    code, out, _ = service.cli(capsys, "errors", job_id)
    assert code == 0 and {json.loads(line)["row"] for line in out.splitlines()} == set(rows.errors)
    code, out, _ = service.cli(capsys, "errors", job_id, "-o", str(tmp_path / "e.csv"))
    assert code == 0 and len(pd.read_csv(tmp_path / "e.csv")) == 20

    code, _, err = service.cli(capsys, "cancel", job_id)
    assert code == 1 and "already finished" in err

    outbox.auto = False
    queued = service.client().submit(path, "fussy", options={"chunk_size": 1000})["id"]
    code, out, _ = service.cli(capsys, "cancel", queued)
    assert code == 0 and out.startswith(f"job {queued} ")
    outbox.work()
    code, out, _ = service.cli(capsys, "status", queued, "--wait")
    assert code == 4 and "status    cancelled" in out and "5,000 skipped" in out


def test_predict_prints_predictions_and_row_errors(service, capsys, tmp_path):
    row = {"f0": 0.5, "f1": 1.0, "f2": -0.2, "f3": 0.0, "f4": 2.0}
    code, out, _ = service.cli(capsys, "predict", "fussy", "--row", json.dumps(row), "--probabilities")
    assert code == 0 and out.startswith("prediction: yes\nprobabilities: no 0.")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(row) + "\n" + json.dumps({"f0": "x"}) + "\n")
    code, out, _ = service.cli(capsys, "predict", "fussy", "--rows", str(rows))
    assert code == 5 and out.splitlines()[0] == "row 0: yes" and out.splitlines()[1].startswith("row 1: error ")
    code, out, _ = service.cli(capsys, "predict", "fussy", "--row", json.dumps(row), "--json")
    assert code == 0 and json.loads(out)["prediction"] == "yes"


def test_failures_print_the_message_and_exit_by_kind(service, capsys, planted, tmp_path, monkeypatch):
    """No traceback: the service's message and a distinct exit status for each kind of failure."""
    path, _ = planted
    code, out, err = service.cli(capsys, "submit", "nope", str(path))
    assert code == 1 and err.startswith("predq: ") and "No model named 'nope'" in err and out == ""
    code, _, err = service.cli(capsys, "predict", "fussy", "--row", '{"f0": 1}')
    assert code == 1 and "  f1: missing_feature" in err
    code, _, err = service.cli(capsys, "status", "job_nope")
    assert code == 1 and "No job 'job_nope'" in err
    assert predq(["--url", service.url, "models"]) == 1  # no key
    assert "API key" in capsys.readouterr().err

    code, _, err = service.cli(capsys, "predict", "fussy", "--row", "not json")
    assert code == 2 and "not JSON" in err
    code, _, err = service.cli(capsys, "submit", "fussy", str(tmp_path / "missing.csv"))
    assert code == 2 and "does not exist" in err
    code, _, err = service.cli(capsys, "submit", "fussy", str(path), "-o", str(tmp_path / "out.txt"))
    assert code == 2 and ".parquet" in err
    code, _, err = service.cli(capsys, "jobs", "--status", "done")
    assert code == 2

    monkeypatch.setenv("PREDQ_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PREDQ_API_KEY", KEY)
    capsys.readouterr()
    assert predq(["models"]) == 3
    err = capsys.readouterr().err
    assert "does not answer: connection refused" in err and "Traceback" not in err
    monkeypatch.setenv("PREDQ_URL", service.url)
    assert predq(["models"]) == 0 and "fussy_reg  v1       regression" in capsys.readouterr().out


def test_ctrl_c_while_waiting_leaves_the_job_and_says_how_to_resume(service, capsys, outbox, planted, monkeypatch):
    path, _ = planted
    outbox.auto = False

    def interrupted(self, job_id, on_progress=None, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "wait", interrupted)
    code, out, err = service.cli(capsys, "submit", "fussy", str(path), "--wait", "-o", "out.parquet")
    assert code == 130 and out == ""
    job_id = err.split("job ")[1].split()[0]
    assert f"predq status {job_id} --wait, then predq results {job_id} -o out.parquet" in err
    assert "not cancelled" in err
    assert service.client().status(job_id)["status"] == "queued"


def test_a_failed_job_exits_4_with_its_error(service, capsys, outbox, planted):
    """A job that blows its error budget ends failed: exit 4, and the summary names the error."""
    path, _ = planted
    code, out, err = service.cli(capsys, "submit", "fussy", str(path), "--chunk-size", "1000",
                                 "--max-error-rate", "0", "--wait")
    assert code == 4, err
    assert " failed: 5,000 rows: " in out.splitlines()[0]
    assert "error: error_budget_exceeded: " in out
