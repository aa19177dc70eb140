"""Scheduled runs end to end: real beat and worker processes on a private Redis, runs read their sources, their
output folders hold results, errors and a manifest, and each slot makes one job however many ask for it."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from shared import keys
from shared.registry import Registry
from shared.schedules import ScheduleFileError
from tests.support.data import base_frame
from tests.support.models import FEATURES, SENTINEL, install_test_models
from tests.support.processes import REPO_ROOT, ApiServer, CeleryWorker, RedisServer, group_members, wait_for

UTC = dt.UTC
TICK = "1"
LOCK_TIMEOUT = 6
N_ROWS = 300


# ---------------------------------------------------------------------------------------------------
# A beat process
# ---------------------------------------------------------------------------------------------------

class Beat:
    """`celery -A worker.app beat` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> Beat:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO"],
                cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def has_lock(self) -> bool:
        return "beat: Acquired lock" in self.log()

    def sends(self) -> int:
        """How many times this beat sent the schedules tick."""
        return self.log().count("Sending due task schedules")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Signal the whole process group, wait for the main process and every member to be gone."""
        if self.popen is None:
            return 0
        pgid = self.popen.pid
        if self.popen.poll() is None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        try:
            os.killpg(pgid, signal.SIGKILL)  # anything the main process left behind
        except ProcessLookupError:
            pass
        wait_for(lambda: not group_members(pgid), timeout=timeout, what=f"beat process group {pgid} to exit")
        assert self.popen.poll() is not None
        return self.popen.returncode


# ---------------------------------------------------------------------------------------------------
# One private stack per test
# ---------------------------------------------------------------------------------------------------

def schedule_toml(name: str, cron: str, inputs: Path, outputs: Path, **extra) -> str:
    fields = {"name": name, "cron": cron, "date_offset": 0, "model": "fussy",
              "source": f"file://{inputs}/{{date}}.csv", "output": f"file://{outputs}/{name}/{{date}}/", **extra}
    lines = ["[[schedule]]"]
    for key, value in fields.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.redis_server = RedisServer(dir=str(tmp / "redis"))
        self.redis_server.start()
        self.redis = self.redis_server.client()
        self.models_dir = tmp / "models"
        install_test_models(self.models_dir)
        self.inputs = tmp / "in"
        self.inputs.mkdir()
        self.outputs = tmp / "out"
        self.outputs.mkdir()
        self.schedules_file = tmp / "schedules.toml"
        self.frame = base_frame(N_ROWS)
        self.workers: list[CeleryWorker] = []
        self.beats: list[Beat] = []
        self.apis: list[ApiServer] = []
        self._app = None

    # -- configuration --------------------------------------------------------------------------------
    def write_schedules(self, *toml: str) -> None:
        self.schedules_file.write_text("\n".join(toml))

    def write_input(self, date: dt.date | str, frame: pd.DataFrame | None = None) -> Path:
        path = self.inputs / f"{date}.csv"
        (self.frame if frame is None else frame).to_csv(path, index=False, float_format="%.17g")
        return path

    def write_inputs_around_today(self) -> None:
        today = dt.datetime.now(UTC).date()
        for k in (-1, 0, 1):
            self.write_input(today + dt.timedelta(days=k))

    @property
    def settings(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_server.url, "MODELS_DIR": str(self.models_dir),
                "SCHEDULES_FILE": str(self.schedules_file), "SOURCE_ROOTS": str(self.inputs),
                "SCHEDULE_TICK_SECONDS": TICK, "BEAT_LOCK_TIMEOUT": str(LOCK_TIMEOUT)}

    def process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BROKER_URL")}
        env.update(self.settings)
        env.update({"PYTHONPATH": REPO_ROOT, "PYTHONUNBUFFERED": "1"})
        return env

    # -- processes --------------------------------------------------------------------------------------
    def worker(self, *, wait_ready: bool = True) -> CeleryWorker:
        extra = {k: v for k, v in self.settings.items() if k not in ("REDIS_URL", "MODELS_DIR")}
        proc = CeleryWorker(self.redis_server.url, models_dir=str(self.models_dir), env=extra, concurrency=2,
                            log_dir=str(self.tmp / f"worker{len(self.workers)}"))
        self.workers.append(proc)
        return proc.start(wait_ready=wait_ready)

    def beat(self) -> Beat:
        beat = Beat(self.process_env(), self.tmp / f"beat{len(self.beats)}.log")
        self.beats.append(beat)
        return beat.start()

    def api_server(self, **kwargs) -> ApiServer:
        extra = {k: v for k, v in self.settings.items() if k not in ("REDIS_URL", "MODELS_DIR")}
        proc = ApiServer(self.redis_server.url, models_dir=str(self.models_dir), env=extra,
                         log_dir=str(self.tmp / f"api{len(self.apis)}"), **kwargs)
        self.apis.append(proc)
        return proc.start()

    @property
    def app(self):
        if self._app is None:
            from api import create_app

            self._app = create_app(dict(self.settings))
        return self._app

    def client(self):
        return self.app.test_client()

    def close(self) -> None:
        errors = []
        for beat in self.beats:
            try:
                beat.kill()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                errors.append(e)
        for proc in [*self.workers, *self.apis]:
            try:
                proc.stop()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if self._app is not None:
            svc = self._app.extensions["predq"]
            svc.redis.close()
        self.redis.close()
        self.redis_server.stop()
        if errors:
            raise errors[0]

    # -- reading state ----------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        response = self.client().get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.json
        return response.json

    def runs(self, name: str) -> list[tuple[str, float]]:
        return [(m.decode(), score) for m, score in self.redis.zrange(keys.schedule_runs(name), 0, -1, withscores=True)]

    def run_jobs(self, name: str) -> list[dict]:
        return [self.job(job_id) for job_id, _ in self.runs(name)]

    def all_jobs(self) -> list[dict]:
        ids = [m.decode() for m in self.redis.zrange(keys.JOBS, 0, -1)]
        return [self.job(job_id) for job_id in ids]

    def wait_terminal(self, job_id: str, timeout: float = 30) -> dict:
        terminal = {"succeeded", "partially_succeeded", "failed", "cancelled"}
        return wait_for(lambda: (j := self.job(job_id))["status"] in terminal and j, timeout=timeout,
                        what=f"job {job_id} to finish")

    def output_written(self, job_id: str) -> bool:
        """The worker logged that it wrote this run's output."""
        for worker in self.workers:
            for line in worker.log().splitlines():
                if job_id in line and "run output written" in line:
                    return True
        return False

    def broker_idle(self) -> bool:
        return self.redis.llen("predq.chunks") == 0


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------------
# Checks shared by the tests
# ---------------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_predictions(models_dir: Path, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list]:
    mv = Registry(models_dir).get("fussy")
    X = frame[FEATURES]
    return mv.estimator.predict(X), mv.estimator.predict_proba(X), list(mv.estimator.classes_)


def assert_results_equal_predict(results: pd.DataFrame, models_dir: Path, frame: pd.DataFrame,
                                 probabilities: bool) -> None:
    results = results.sort_values("row").reset_index(drop=True)
    assert results["row"].tolist() == list(range(len(frame)))
    assert results["id"].astype(str).tolist() == frame["id"].tolist()
    labels, proba, classes = expected_predictions(models_dir, frame)
    assert results["prediction"].astype(str).tolist() == [str(x) for x in labels]
    if probabilities:
        for k, cls in enumerate(classes):
            np.testing.assert_allclose(results[f"probability_{cls}"].to_numpy(), proba[:, k], rtol=1e-9, atol=1e-12)


def assert_manifest_matches(folder: Path, job: dict, *, status: str) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["job_id"] == job["id"]
    assert manifest["status"] == status == job["status"]
    assert manifest["counts"] == job["counts"]
    counts = manifest["counts"]
    assert counts["succeeded"] + counts["failed"] + counts["skipped"] == counts["total"]
    assert manifest["model"] == job["model"]
    assert manifest["schedule"] == job["schedule"]["name"]
    assert manifest["slot"] == job["schedule"]["slot"] and manifest["date"] == job["schedule"]["date"]
    assert set(manifest["files"]) == {"results.parquet", "errors.parquet"}
    for name, meta in manifest["files"].items():
        path = folder / name
        assert path.is_file(), name
        assert meta["sha256"] == sha256(path), name
        assert meta["bytes"] == path.stat().st_size, name
    leftovers = [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert leftovers == [], leftovers
    return manifest


def slot_of(job: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(job["schedule"]["slot"])


def parse_rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def assert_one_job_per_slot(stack: Stack, name: str) -> list[dict]:
    runs = stack.run_jobs(name)
    slots = [j["schedule"]["slot"] for j in runs]
    assert len(slots) == len(set(slots)), f"a slot ran twice: {sorted(slots)}"
    scheduled = [j for j in stack.all_jobs() if j["schedule"] and j["schedule"]["name"] == name]
    assert sorted(j["id"] for j in scheduled) == sorted(j["id"] for j in runs), "a run job outside the runs set"
    for job_id, score in stack.runs(name):
        job = next(j for j in runs if j["id"] == job_id)
        assert slot_of(job).timestamp() == score
        assert stack.redis.get(keys.schedule_slot(name, slot_of(job).isoformat())).decode() == job_id
    return runs


# ---------------------------------------------------------------------------------------------------
# 1. beat starts runs; a run's output folder
# ---------------------------------------------------------------------------------------------------

def test_beat_starts_runs_whose_output_folder_holds_results_errors_and_manifest(stack):
    stack.write_schedules(schedule_toml("every2s", "*/2 * * * * *", stack.inputs, stack.outputs,
                                        options={"id_column": "id", "probabilities": True}))
    stack.write_inputs_around_today()
    worker = stack.worker()
    beat = stack.beat()

    def a_finished_run():
        for job in stack.run_jobs("every2s"):
            if job["status"] == "succeeded" and stack.output_written(job["id"]):
                return job
        assert beat.running, beat.log()[-3000:]
        return None

    wait_for(a_finished_run, timeout=40, what="a scheduled run to finish and write its output")
    assert beat.kill(signal.SIGTERM) is not None
    assert not beat.running

    # ticks already sent may still start runs: wait until every run has ended and written its files
    def settled():
        jobs = stack.run_jobs("every2s")
        done = stack.broker_idle() and all(j["status"] == "succeeded" and stack.output_written(j["id"]) for j in jobs)
        return done and jobs

    jobs = wait_for(settled, timeout=40, what="every run to finish and write its output")
    runs = assert_one_job_per_slot(stack, "every2s")
    assert len(runs) == len(jobs)

    latest = max(jobs, key=slot_of)
    date = latest["schedule"]["date"]
    assert date == slot_of(latest).date().isoformat()  # date_offset 0, UTC
    folder = stack.outputs / "every2s" / date
    manifest = json.loads((folder / "manifest.json").read_text())
    same_date = {j["id"]: j for j in jobs if j["schedule"]["date"] == date}
    assert manifest["job_id"] in same_date
    job = same_date[manifest["job_id"]]
    assert_manifest_matches(folder, job, status="succeeded")
    mv = Registry(stack.models_dir).get("fussy")
    assert manifest["model"] == {"name": "fussy", "version": "v1", "sha256": mv.sha256}
    assert manifest["counts"] == {"total": N_ROWS, "succeeded": N_ROWS, "failed": 0, "skipped": 0}
    assert manifest["error"] is None
    assert manifest["source"] == f"file://{stack.inputs}/{date}.csv"
    assert job["metadata"] == {"schedule": "every2s", "date": date}

    results = pq.read_table(folder / "results.parquet").to_pandas()
    assert_results_equal_predict(results, stack.models_dir, stack.frame, probabilities=True)
    errors = pq.read_table(folder / "errors.parquet")
    assert errors.num_rows == 0
    assert {"row", "id", "code", "message"} <= set(errors.column_names)

    # the API lists the schedule with its last run and its next one
    before = dt.datetime.now(UTC)
    body = stack.client().get("/v1/schedules").json
    (entry,) = body["data"]
    assert entry["name"] == "every2s" and entry["cron"] == "*/2 * * * * *" and entry["timezone"] == "UTC"
    assert entry["model"] == "fussy"
    assert entry["source"] == f"file://{stack.inputs}/{{date}}.csv"
    assert entry["output"] == f"file://{stack.outputs}/every2s/{{date}}/"
    assert entry["last_run"] == {"slot": latest["schedule"]["slot"], "date": date, "job_id": latest["id"],
                                 "status": "succeeded"}
    next_run = parse_rfc3339(entry["next_run_at"])
    assert before - dt.timedelta(seconds=1) < next_run <= before + dt.timedelta(seconds=3)
    assert next_run.second % 2 == 0 and next_run.microsecond == 0
    assert worker.running


# ---------------------------------------------------------------------------------------------------
# 2. two beats
# ---------------------------------------------------------------------------------------------------

def test_two_beats_make_one_job_per_slot_and_the_second_takes_over(stack):
    from shared.dispatch import TICK_SCHEDULES, make_celery
    from shared.settings import load_settings

    stack.write_schedules(schedule_toml("every2s", "*/2 * * * * *", stack.inputs, stack.outputs,
                                        options={"id_column": "id"}))
    stack.write_inputs_around_today()
    stack.worker()
    beats = [stack.beat(), stack.beat()]

    active = wait_for(lambda: [b for b in beats if b.has_lock()], timeout=30, what="one beat to take the lock")
    assert len(active) == 1, "both beats took the lock"
    (active,) = active
    (passive,) = [b for b in beats if b is not active]

    # duplicate tick messages on top of the beat's own
    celery = make_celery(load_settings(stack.settings))
    try:
        def enough_runs():
            for b in beats:
                assert b.running, b.log()[-3000:]
            celery.send_task(TICK_SCHEDULES)
            runs = stack.runs("every2s")
            return len(runs) >= 8 and runs

        wait_for(enough_runs, timeout=45, interval=0.3, what="eight scheduled runs")
    finally:
        celery.close()
    assert passive.running and not passive.has_lock(), passive.log()[-3000:]
    assert passive.sends() == 0, "the beat waiting for the lock sent ticks"
    assert active.sends() >= 8
    before = assert_one_job_per_slot(stack, "every2s")
    first_slot = min(slot_of(j) for j in before)
    last_before = max(slot_of(j) for j in before)
    span = (last_before - first_slot).total_seconds()
    assert span >= 2 * (len(before) - 1)  # distinct slots two seconds apart

    # the active beat dies: the other takes over once the lock expires
    active.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: passive.has_lock() or not passive.running, timeout=LOCK_TIMEOUT + 15,
             what="the waiting beat to take the lock")
    assert passive.running, passive.log()[-3000:]
    took_over = time.monotonic() - killed_at
    assert took_over <= LOCK_TIMEOUT + 10, took_over
    took_over_wall = dt.datetime.now(UTC)

    def runs_continue():
        later = [j for j in stack.run_jobs("every2s") if slot_of(j) > took_over_wall]
        return len(later) >= 2 and later

    wait_for(runs_continue, timeout=25, what="runs started by the beat that took over")
    assert passive.sends() >= 2
    passive.kill(signal.SIGTERM)
    wait_for(stack.broker_idle, timeout=20, what="the queue to drain")
    after = assert_one_job_per_slot(stack, "every2s")
    assert len(after) > len(before)


# ---------------------------------------------------------------------------------------------------
# 3. manual triggers racing the scheduled one
# ---------------------------------------------------------------------------------------------------

def _post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_manual_triggers_racing_the_scheduled_one_make_one_job(stack):
    from shared.runs import tick

    stack.write_schedules(schedule_toml("daily", "0 3 * * *", stack.inputs, stack.outputs))
    date = "2026-02-10"
    stack.write_input(date)
    api = stack.api_server(workers=2, threads=8)
    svc = stack.app.extensions["predq"]
    schedule = svc.schedules["daily"]
    slot = schedule.slot_for_date(dt.date.fromisoformat(date))
    assert slot == dt.datetime(2026, 2, 10, 3, tzinfo=UTC)
    # the schedule has been seen before its slot, so a tick just after the slot finds it due
    stack.redis.set(keys.schedule_mark("daily"), (slot - dt.timedelta(hours=1)).isoformat())

    url = f"{api.url}/v1/schedules/daily/run?date={date}"
    barrier = threading.Barrier(11)
    answers: list[tuple[int, dict]] = []
    ticked: list[list[str]] = []
    failures: list[BaseException] = []

    def manual():
        try:
            barrier.wait(timeout=30)
            answers.append(_post(url))
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    def scheduled():
        try:
            barrier.wait(timeout=30)
            ticked.append(tick(svc.run_context(), svc.schedules, now=slot + dt.timedelta(seconds=30)))
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    threads = [threading.Thread(target=manual) for _ in range(10)] + [threading.Thread(target=scheduled)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not failures, failures
    assert len(answers) == 10 and len(ticked) == 1

    statuses = sorted(status for status, _ in answers)
    assert set(statuses) <= {200, 202}, answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1, answers
    (job_id,) = ids
    created_by_tick = ticked[0] == [job_id]
    assert ticked[0] in ([], [job_id])
    assert statuses.count(202) + int(created_by_tick) == 1, (statuses, ticked)
    for _, body in answers:
        assert body["schedule"] == {"name": "daily", "slot": slot.isoformat(), "date": date}
    assert [j for j, _ in stack.runs("daily")] == [job_id]
    assert [j["id"] for j in stack.all_jobs()] == [job_id]
    assert stack.redis.get(keys.schedule_mark("daily")).decode() == slot.isoformat()

    # once more: the run that exists
    status, body = _post(url)
    assert (status, body["id"]) == (200, job_id)
    # rerun=true makes a new one, which the date answers with from then on
    status, rerun = _post(url + "&rerun=true")
    assert status == 202 and rerun["id"] != job_id
    assert rerun["schedule"] == {"name": "daily", "slot": slot.isoformat(), "date": date}
    status, body = _post(url)
    assert (status, body["id"]) == (200, rerun["id"])
    assert sorted(j for j, _ in stack.runs("daily")) == sorted([job_id, rerun["id"]])
    # a date the schedule has no slot for, and a schedule that does not exist
    status, body = _post(f"{api.url}/v1/schedules/daily/run?date=2026-02-30")
    assert status == 400 and body["error"]["code"] == "invalid_parameter"
    status, body = _post(f"{api.url}/v1/schedules/nope/run?date={date}")
    assert status == 404 and body["error"]["code"] == "schedule_not_found"


# ---------------------------------------------------------------------------------------------------
# 4. a missing source
# ---------------------------------------------------------------------------------------------------

def test_a_missing_source_fails_the_run_and_its_manifest_says_so(stack):
    stack.write_schedules(schedule_toml("daily", "0 3 * * *", stack.inputs, stack.outputs,
                                        options={"id_column": "id"}),
                          schedule_toml("daily-csv", "0 4 * * *", stack.inputs, stack.outputs, format="csv",
                                        options={"id_column": "id"}))
    stack.write_input("2026-02-11", pd.DataFrame({"a": [1, 2], "b": [3, 4]}))  # readable, without the features
    stack.worker()
    client = stack.client()

    response = client.post("/v1/schedules/daily/run?date=2026-02-10")
    assert response.status_code == 202, response.json
    job = stack.wait_terminal(response.json["id"])
    source = f"file://{stack.inputs}/2026-02-10.csv"
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_file"
    assert source in job["error"]["message"] or f"{stack.inputs}/2026-02-10.csv" in job["error"]["message"]
    assert job["counts"]["succeeded"] + job["counts"]["failed"] + job["counts"]["skipped"] == job["counts"]["total"]

    folder = stack.outputs / "daily" / "2026-02-10"
    wait_for(lambda: (folder / "manifest.json").exists(), timeout=30, what="the failed run's manifest")
    manifest = assert_manifest_matches(folder, job, status="failed")
    assert manifest["error"] == job["error"]
    assert manifest["source"] == source
    assert pq.read_table(folder / "results.parquet").num_rows == 0

    # a source without the model's features fails as well, naming what is missing
    response = client.post("/v1/schedules/daily/run?date=2026-02-11")
    assert response.status_code == 202, response.json
    job = stack.wait_terminal(response.json["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "missing_columns", job
    assert "f0" in job["error"]["message"]
    folder = stack.outputs / "daily" / "2026-02-11"
    wait_for(lambda: (folder / "manifest.json").exists(), timeout=30, what="the second failed run's manifest")
    assert_manifest_matches(folder, job, status="failed")

    # a present source with a few bad rows, written as CSV: the rows that fail are in errors.csv
    frame = stack.frame.copy()
    text = frame.to_csv(index=False, float_format="%.17g").splitlines()
    bad = {3: "invalid_type", 10: "prediction_failed"}
    cells = text[3 + 1].split(",")
    cells[2] = "abc"
    text[3 + 1] = ",".join(cells)
    cells = text[10 + 1].split(",")
    cells[3] = repr(SENTINEL)
    text[10 + 1] = ",".join(cells)
    (stack.inputs / "2026-02-12.csv").write_text("\n".join(text) + "\n")
    response = client.post("/v1/schedules/daily-csv/run?date=2026-02-12")
    assert response.status_code == 202, response.json
    job = stack.wait_terminal(response.json["id"])
    assert job["status"] == "partially_succeeded", job
    assert job["counts"] == {"total": N_ROWS, "succeeded": N_ROWS - 2, "failed": 2, "skipped": 0}
    folder = stack.outputs / "daily-csv" / "2026-02-12"
    wait_for(lambda: (folder / "manifest.json").exists(), timeout=30, what="the CSV run's manifest")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"results.csv", "errors.csv"}
    for name, meta in manifest["files"].items():
        assert meta["sha256"] == sha256(folder / name)
    assert manifest["counts"] == job["counts"] and manifest["status"] == "partially_succeeded"
    errors = pd.read_csv(folder / "errors.csv")
    assert dict(zip(errors["row"], errors["code"])) == bad
    assert errors["id"].tolist() == [f"r{r}" for r in sorted(bad)]
    results = pd.read_csv(folder / "results.csv", dtype={"id": str, "prediction": str})
    good = frame.drop(index=list(bad)).reset_index(drop=True)
    labels, _, _ = expected_predictions(stack.models_dir, good)
    results = results.sort_values("row").reset_index(drop=True)
    assert results["row"].tolist() == [r for r in range(N_ROWS) if r not in bad]
    assert results["id"].tolist() == good["id"].tolist()
    assert results["prediction"].tolist() == [str(x) for x in labels]


# ---------------------------------------------------------------------------------------------------
# 5. one-off source jobs
# ---------------------------------------------------------------------------------------------------

def test_source_jobs_are_allowed_only_under_the_roots(stack):
    stack.write_schedules(schedule_toml("daily", "0 3 * * *", stack.inputs, stack.outputs))
    good = stack.write_input("batch")
    outside = stack.tmp / "outside"
    outside.mkdir()
    base_frame(5).to_csv(outside / "secret.csv", index=False)
    os.symlink(outside / "secret.csv", stack.inputs / "link.csv")
    sibling = Path(f"{stack.inputs}2")
    sibling.mkdir()
    base_frame(5).to_csv(sibling / "x.csv", index=False)
    stack.worker()
    client = stack.client()

    for source in (str(outside / "secret.csv"), f"file://{outside}/secret.csv",
                   f"{stack.inputs}/../outside/secret.csv", f"file://{stack.inputs}/../outside/secret.csv",
                   f"{stack.inputs}/link.csv", f"{sibling}/x.csv", "s3://bucket/x.csv", "relative/x.csv"):
        response = client.post("/v1/jobs", json={"model": "fussy", "source": source, "id_column": "id"})
        assert response.status_code == 403, (source, response.status_code, response.json)
        assert response.json["error"]["code"] == "source_not_allowed", (source, response.json)
    assert stack.redis.zcard(keys.JOBS) == 0

    for source in (str(good), f"file://{good}"):
        response = client.post("/v1/jobs", json={"model": "fussy", "source": source, "id_column": "id",
                                                 "probabilities": True})
        assert response.status_code == 202, response.json
        job = stack.wait_terminal(response.json["id"])
        assert job["status"] == "succeeded", job
        assert job["counts"] == {"total": N_ROWS, "succeeded": N_ROWS, "failed": 0, "skipped": 0}
        assert job["schedule"] is None
        download = client.get(f"/v1/jobs/{job['id']}/results?format=parquet")
        assert download.status_code == 200
        results = pq.read_table(io.BytesIO(download.data)).to_pandas()
        assert_results_equal_predict(results, stack.models_dir, stack.frame, probabilities=True)


# ---------------------------------------------------------------------------------------------------
# 6. missed runs
# ---------------------------------------------------------------------------------------------------

def test_missed_slots_are_caught_up_once_with_catchup_latest(stack):
    """Slots every 2 s for a while, then none for a while: beat stopped during the first stretch and started again
    in the quiet one catches up the latest missed slot once (a run for a slot before the restart), and the
    slots after the quiet stretch run as usual."""
    stack.write_inputs_around_today()
    base = dt.datetime.now(UTC).replace(microsecond=0)
    first = [base + dt.timedelta(seconds=s) for s in range(12, 29, 2)]       # beat up, then stopped
    last_missed = first[-1]
    after = [base + dt.timedelta(seconds=s) for s in (46, 48)]               # after the quiet stretch
    seconds = ",".join(str(s) for s in sorted({t.second for t in first + after}))
    stack.write_schedules(schedule_toml("bursts", f"{seconds} * * * * *", stack.inputs, stack.outputs,
                                        catchup="latest"))
    beat = stack.beat()
    stack.worker()
    wait_for(lambda: len(stack.runs("bursts")) >= 2, timeout=base.timestamp() + 24 - time.time(), what="two scheduled runs")
    beat.kill(signal.SIGTERM)
    assert "beat: Releasing lock" in beat.log()

    def quiet():
        jobs = stack.run_jobs("bursts")
        return stack.broker_idle() and all(j["status"] == "succeeded" for j in jobs) and jobs

    before = wait_for(quiet, timeout=20, what="the runs before the downtime to end")
    mark = dt.datetime.fromisoformat(stack.redis.get(keys.schedule_mark("bursts")).decode())
    assert max(slot_of(j) for j in before) == mark
    missed = [t for t in first if t > mark]
    assert len(missed) >= 3, f"beat stopped too late to miss several slots (mark {mark}, base {base})"

    # down across the rest of the first stretch
    wait_for(lambda: dt.datetime.now(UTC) > last_missed + dt.timedelta(seconds=1), timeout=25,
             what="the first stretch of slots to pass without beat")
    assert len(stack.runs("bursts")) == len(before), "a run started while beat was down"
    restarted = dt.datetime.now(UTC)
    stack.beat()

    def caught_up():
        return [j for j in stack.run_jobs("bursts") if slot_of(j) > mark]

    (catch_up,) = wait_for(caught_up, timeout=after[0].timestamp() - time.time() - 0.5,
                           what="the catch-up run before the next stretch of slots")
    assert slot_of(catch_up) == last_missed, catch_up["schedule"]
    assert parse_rfc3339(catch_up["created_at"]) >= restarted.replace(microsecond=0)
    assert catch_up["schedule"]["date"] == last_missed.date().isoformat()
    for slot in missed[:-1]:
        assert stack.redis.get(keys.schedule_slot("bursts", slot.isoformat())) is None, slot
    # once, however many ticks look at it
    assert [j["id"] for j in caught_up()] == [catch_up["id"]]

    # normal runs continue
    later = wait_for(lambda: (js := caught_up()) and len(js) >= 3 and js, timeout=25,
                     what="the runs after the quiet stretch")
    assert sorted(slot_of(j) for j in later) == [last_missed, *after]
    assert_one_job_per_slot(stack, "bursts")


# ---------------------------------------------------------------------------------------------------
# 7. the command line
# ---------------------------------------------------------------------------------------------------

def _cli(api: ApiServer, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREDQ_API_KEY",)}
    env.update({"PREDQ_URL": api.url, "PYTHONPATH": REPO_ROOT})
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_command_line_lists_and_runs_schedules(stack):
    stack.write_schedules(schedule_toml("nightly-fussy", "0 3 * * *", stack.inputs, stack.outputs),
                          schedule_toml("every2s", "*/2 * * * * *", stack.inputs, stack.outputs))
    stack.write_input("2026-02-10")
    api = stack.api_server()

    listed = _cli(api, "schedules")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["schedule", "cron"]
    row = next(line for line in lines if line.startswith("nightly-fussy "))
    assert "0 3 * * *" in row and row.rstrip().endswith("-")
    assert any(line.startswith("every2s ") for line in lines)

    started = _cli(api, "run-schedule", "nightly-fussy", "--date", "2026-02-10")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("started: job_") and "for 2026-02-10" in started.stdout, started.stdout
    job_id = started.stdout.split()[1]
    assert [j for j, _ in stack.runs("nightly-fussy")] == [job_id]

    again = _cli(api, "run-schedule", "nightly-fussy", "--date", "2026-02-10")
    assert again.returncode == 0 and again.stdout.startswith(f"already ran: {job_id} "), again.stdout

    rerun = _cli(api, "run-schedule", "nightly-fussy", "--date", "2026-02-10", "--rerun")
    assert rerun.returncode == 0 and rerun.stdout.startswith("started: job_"), rerun.stdout
    assert rerun.stdout.split()[1] != job_id

    listed = _cli(api, "schedules")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("nightly-fussy "))
    assert "2026-02-10" in row and rerun.stdout.split()[1] in row

    wrong = _cli(api, "run-schedule", "nope", "--date", "2026-02-10")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("predq: ") and "No schedule named 'nope'" in wrong.stderr, wrong.stderr
    assert "nightly-fussy" in wrong.stderr and wrong.stdout == ""

    bad_date = _cli(api, "run-schedule", "nightly-fussy", "--date", "2026-02-30")
    assert bad_date.returncode == 1 and "2026-02-30" in bad_date.stderr, bad_date.stderr


# ---------------------------------------------------------------------------------------------------
# 8. an invalid schedules file
# ---------------------------------------------------------------------------------------------------

def test_an_invalid_schedules_file_stops_every_process_at_start(stack):
    from api import create_app

    stack.write_schedules(schedule_toml("fine", "0 3 * * *", stack.inputs, stack.outputs),
                          schedule_toml("broken", "0 3 * * *", stack.inputs, stack.outputs,
                                        timezone="Europe/Atlantis"))
    with pytest.raises(ScheduleFileError) as caught:
        create_app(dict(stack.settings))
    message = str(caught.value)
    assert "'broken'" in message and "field 'timezone'" in message and "Europe/Atlantis" in message, message

    worker = stack.worker(wait_ready=False)
    wait_for(lambda: not worker.running, timeout=60, what="the worker to exit")
    assert worker.returncode != 0
    log = worker.log()
    assert "'broken'" in log and "field 'timezone'" in log, log[-3000:]
    assert not worker.is_ready()

    beat = stack.beat()
    wait_for(lambda: not beat.running, timeout=60, what="beat to exit")
    assert beat.kill() != 0
    assert "'broken'" in beat.log() and "field 'timezone'" in beat.log(), beat.log()[-3000:]
