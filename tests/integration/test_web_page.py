"""The web page at `/` in headless Chromium, against a real gunicorn API, a Celery worker and a Redis-compatible server.

The module starts its own server (the session worker must not take these jobs: it lacks the slow model), one worker
whose every chunk takes SLEEP seconds, and two APIs on it: one without keys and one with a key file.
"""
from __future__ import annotations

import json
import math
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from shared.auth import new_key
from tests.support.browser import ensure_chromium, start_chrome
from tests.support.models import FEATURES, PREDICT_SLEEP_ENV, install_fault_models, training_frame
from tests.support.processes import REPO_ROOT, ApiServer, CeleryWorker, RedisServer, wait_for

pytestmark = pytest.mark.timeout(300)

SLEEP = "0.25"  # seconds each chunk's predict sleeps: a job of 20 chunks runs for several seconds
TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
WAIT = 60  # seconds: generous, for a busy machine


# -- processes and browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("web")
    print(f"process logs under {tmp}")
    models_dir = tmp / "models"
    install_fault_models(models_dir)
    key, entry = new_key("web", ["predict", "jobs"])
    jobs_key, jobs_entry = new_key("jobs-only", ["jobs"])
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps({"keys": [entry, jobs_entry]}))
    (tmp / "redis").mkdir()
    redis = RedisServer(dir=str(tmp / "redis")).start()
    procs = []
    try:
        worker = CeleryWorker(redis.url, models_dir=str(models_dir), concurrency=1, env={PREDICT_SLEEP_ENV: SLEEP},
                              log_dir=str(tmp))
        procs.append(worker)
        worker.start(wait_ready=False)  # it gets ready while the APIs start
        (tmp / "open").mkdir()
        (tmp / "keyed").mkdir()
        open_api = ApiServer(redis.url, models_dir=str(models_dir), log_dir=str(tmp / "open"))
        keyed_api = ApiServer(redis.url, models_dir=str(models_dir), env={"API_KEYS_FILE": str(keys_file)},
                              log_dir=str(tmp / "keyed"))
        procs += [open_api, keyed_api]
        with ThreadPoolExecutor(2) as pool:  # both APIs load their models at once
            for started in [pool.submit(api.start) for api in (open_api, keyed_api)]:
                started.result()
        worker.wait_ready()
        yield SimpleNamespace(open=open_api.url, keyed=keyed_api.url, key=key, jobs_key=jobs_key, tmp=tmp)
    finally:
        errors = []
        for proc in [*reversed(procs), redis]:  # the tests are over: nothing needs a graceful stop
            try:
                proc.kill(signal.SIGKILL)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's chromium and chromium-driver, installed now when missing (as root); a skip only when they cannot be."""
    reason = ensure_chromium()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def driver(chromium, rig):
    downloads = rig.tmp / "downloads"
    downloads.mkdir()
    chrome = start_chrome(rig.tmp / "chromedriver.log", downloads)
    chrome.downloads = downloads
    try:
        yield chrome
    finally:
        chrome.quit()


def artifact_path(name: str) -> Path:
    folder = Path(os.environ.get("PREDQ_TEST_ARTIFACTS") or Path(REPO_ROOT) / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


# -- the API, as a client sees it --------------------------------------------------------------------------

def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def api_get(base: str, path: str, key: str | None = None) -> requests.Response:
    return requests.get(base + path, headers=headers(key), timeout=30)


def submit_slow_job(base: str, rows: int, key: str | None = None) -> str:
    frame = training_frame(rows, seed=5)
    frame.insert(0, "id", [f"r{i}" for i in range(rows)])
    body = {"model": "slow_reg", "rows": frame.to_dict(orient="records"), "id_column": "id", "chunk_size": 100}
    response = requests.post(base + "/v1/jobs", json=body, headers=headers(key), timeout=60)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def upload_csv(path: Path, rows: int, bad_row: int | None = None, columns: list[str] | None = None) -> Path:
    frame = training_frame(rows, seed=9).astype(object)
    if bad_row is not None:
        frame.loc[bad_row, "f2"] = "not-a-number"
    frame.insert(0, "id", [f"u{i}" for i in range(rows)])
    frame[columns or ["id", *FEATURES]].to_csv(path, index=False)
    return path


# -- the page, as a user sees it ------------------------------------------------------------------------------

def shown_job(driver, job_id: str) -> dict | None:
    """What the page shows of a job: status, progress bar value, counts, speed; None while it has no row."""
    return driver.execute_script("""
        const row = document.querySelector(`tr[data-job-id="${arguments[0]}"]`);
        if (!row) return null;
        const text = (s) => row.querySelector(s).textContent;
        return {status: row.dataset.status, progress: row.querySelector("progress").value,
                succeeded: text(".count-succeeded"), failed: text(".count-failed"), total: text(".count-total"),
                skipped: text(".count-skipped"), rows_per_second: text(".rows-per-second"),
                links: [...row.querySelectorAll(".job-actions a")].map((a) => a.getAttribute("href")),
                cancel: row.querySelector("button.cancel") !== null};
    """, job_id)


def shown_models(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#models tbody tr')].map((tr) => tr.dataset.model)")


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def number(text: str) -> int:
    return int(text.replace(",", ""))


def assert_counts_match(shown: dict, job: dict) -> None:
    counts = job["counts"]
    assert {k: number(shown[k]) for k in ("succeeded", "failed", "total", "skipped")} == counts
    assert number(shown["rows_per_second"]) == math.floor(job["rows_per_second"] + 0.5)  # JavaScript's Math.round


def wait_terminal(driver, job_id: str) -> dict:
    return wait_for(lambda: (s := shown_job(driver, job_id)) and s["status"] in TERMINAL and s, timeout=WAIT,
                    what=f"the page to show job {job_id} finished")


def submit_upload(driver, csv: Path, model: str = "slow_reg", id_column: str = "id") -> None:
    Select(driver.find_element(By.ID, "upload-model")).select_by_value(model)
    driver.find_element(By.ID, "upload-file").send_keys(str(csv))
    field = driver.find_element(By.ID, "upload-id-column")
    field.clear()
    field.send_keys(id_column)
    driver.find_element(By.ID, "upload-submit").click()


def upload_message(driver, after: str) -> str:
    """The upload's message once it differs from `after` (the message shown before this upload)."""
    return wait_for(lambda: visible(driver, "upload-message") and (
        text := driver.find_element(By.ID, "upload-message").text) != after and text,
        timeout=WAIT, what="the upload form's message")


# -- without keys -----------------------------------------------------------------------------------------

def test_the_page_lists_models_and_follows_a_running_job_to_its_end(rig, driver):
    """The models are listed; a running job's bar grows while the page polls, ends full, and its counts are the API's."""
    job_id = submit_slow_job(rig.open, 2000)  # 20 chunks of SLEEP seconds each
    driver.get(rig.open + "/")
    assert not visible(driver, "key-prompt")
    names = [m["name"] for m in api_get(rig.open, "/v1/models").json()["data"]]
    assert names
    wait_for(lambda: shown_models(driver) == names, timeout=WAIT, what=f"the page to list the models {names}")
    options = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "upload-model")).options]
    assert options == names

    first = wait_for(lambda: (s := shown_job(driver, job_id)) and 0 < s["progress"] < 1 and s["progress"],
                     timeout=WAIT, what="the page to show the job part done")
    screenshot = artifact_path("web-page-running.png")
    driver.save_screenshot(str(screenshot))
    print(f"screenshot of the page with a running job: {screenshot}")
    second = wait_for(lambda: (s := shown_job(driver, job_id)) and s["progress"] > first and s["progress"],
                      timeout=WAIT, what=f"the job's bar to grow past {first}")
    assert second > first

    shown = wait_terminal(driver, job_id)
    job = api_get(rig.open, f"/v1/jobs/{job_id}").json()
    assert shown["status"] == job["status"] == "succeeded"
    assert shown["progress"] == 1
    assert_counts_match(shown, job)
    assert shown["links"] == [f"/v1/jobs/{job_id}/results?format=csv"] and not shown["cancel"]


def test_the_upload_form_creates_a_job_and_shows_the_servers_refusal(rig, driver, tmp_path):
    """A CSV sent with the form becomes a job (one bad row fails alone); a refused upload shows the server's message."""
    driver.get(rig.open + "/")
    wait_for(lambda: shown_models(driver), timeout=WAIT, what="the models")
    before = {j["id"] for j in api_get(rig.open, "/v1/jobs").json()["data"]}
    submit_upload(driver, upload_csv(tmp_path / "rows.csv", 60, bad_row=7))
    message = upload_message(driver, after="")
    created = {j["id"] for j in api_get(rig.open, "/v1/jobs").json()["data"]} - before
    assert len(created) == 1, message
    job_id = created.pop()
    assert job_id in message and "rows.csv" in message

    shown = wait_terminal(driver, job_id)
    job = api_get(rig.open, f"/v1/jobs/{job_id}").json()
    assert job["model"]["name"] == "slow_reg" and job["counts"]["total"] == 60
    assert shown["status"] == job["status"] == "partially_succeeded"
    assert_counts_match(shown, job)
    assert number(shown["failed"]) == 1
    assert shown["links"] == [f"/v1/jobs/{job_id}/results?format=csv", f"/v1/jobs/{job_id}/errors?format=csv"]

    # Refused: a file without f4; then an id column holding markup, which must show as text, never as an element.
    for csv, id_column in ((upload_csv(tmp_path / "short.csv", 5, columns=["id", "f0", "f1", "f2", "f3"]), "id"),
                           (upload_csv(tmp_path / "rows2.csv", 5), '<img id="injected" src="x">')):
        with csv.open("rb") as f:
            refusal = requests.post(rig.open + "/v1/jobs", data={"model": "slow_reg", "id_column": id_column},
                                    files={"file": (csv.name, f)}, timeout=30)
        assert refusal.status_code == 422
        submit_upload(driver, csv, id_column=id_column)
        message = upload_message(driver, after=message)
        assert refusal.json()["error"]["message"] in message
        assert "error" in driver.find_element(By.ID, "upload-message").get_attribute("class")
    assert driver.execute_script("return document.getElementById('injected')") is None
    assert {j["id"] for j in api_get(rig.open, "/v1/jobs").json()["data"]} == before | {job_id}


def polls(driver, job_id: str) -> int:
    """How many times the page has fetched the job since it loaded (the browser's own record of its requests)."""
    return driver.execute_script("""
        const path = `/v1/jobs/${arguments[0]}`;
        return performance.getEntriesByType("resource").filter((e) => new URL(e.name).pathname === path).length;
    """, job_id)


def polls_started_after(driver, job_id: str, since_ms: float) -> int:
    """How many of the page's fetches of the job started after `since_ms` (performance.now() of the page)."""
    return driver.execute_script("""
        const path = `/v1/jobs/${arguments[0]}`;
        return performance.getEntriesByType("resource")
            .filter((e) => new URL(e.name).pathname === path && e.startTime > arguments[1]).length;
    """, job_id, since_ms)


def cancel_on_page(driver, job_id: str) -> dict:
    wait_for(lambda: (s := shown_job(driver, job_id)) and s["cancel"], timeout=WAIT, what="a Cancel button")
    driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] button.cancel').click()
    return wait_terminal(driver, job_id)


def test_cancel_ends_a_running_job_and_the_page_stops_polling_what_has_ended(rig, driver):
    """Cancel ends a job cancelled with the API's counts; a job that has ended is polled no more, others still are."""
    done = submit_slow_job(rig.open, 100)
    wait_for(lambda: api_get(rig.open, f"/v1/jobs/{done}").json()["status"] in TERMINAL, timeout=WAIT,
             what="a one-chunk job to finish")
    finished = [j["id"] for j in api_get(rig.open, "/v1/jobs").json()["data"] if j["status"] in TERMINAL]
    first, second = submit_slow_job(rig.open, 4000), submit_slow_job(rig.open, 4000)  # 40 chunks each: minutes
    driver.get(rig.open + "/")
    shown = cancel_on_page(driver, first)
    job = api_get(rig.open, f"/v1/jobs/{first}").json()
    assert shown["status"] == job["status"] == "cancelled"
    assert job["counts"]["skipped"] > 0
    assert {k: number(shown[k]) for k in ("succeeded", "failed", "total", "skipped")} == job["counts"]

    ended_at = driver.execute_script("return performance.now()")  # the page shows the job cancelled from here on
    still_running = polls(driver, second)
    wait_for(lambda: polls(driver, second) >= still_running + 3, timeout=WAIT, what="three more polls of a running job")
    # A poll already in flight at the cancel may still complete; none may start after the page knew of the end.
    assert polls_started_after(driver, first, ended_at) == 0
    assert done in finished and all(polls(driver, job_id) == 0 for job_id in finished)
    assert cancel_on_page(driver, second)["status"] == "cancelled"


# -- with keys ------------------------------------------------------------------------------------------------

def test_with_keys_the_page_asks_for_one_and_keeps_it_for_the_tab(rig, driver, tmp_path):
    """The page itself is open and holds no data; a wrong key is refused with the prompt, a right one shows data."""
    page = requests.get(rig.keyed + "/", timeout=30)
    assert page.status_code == 200 and 'data-keys-required="true"' in page.text
    assert "slow_reg" not in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert api_get(rig.keyed, "/v1/models").status_code == 401

    driver.get(rig.keyed + "/")
    wait_for(lambda: visible(driver, "key-prompt"), timeout=WAIT, what="the key prompt")
    assert not visible(driver, "content")

    refused = api_get(rig.keyed, "/v1/models", "pq_wrong").json()["error"]["message"]
    driver.find_element(By.ID, "key-input").send_keys("pq_wrong\n")
    wait_for(lambda: visible(driver, "key-prompt") and driver.find_element(By.ID, "key-message").text == refused,
             timeout=WAIT, what="the prompt to come back with the server's refusal")
    assert driver.execute_script("return sessionStorage.getItem('predq.apiKey')") is None

    driver.find_element(By.ID, "key-input").send_keys(rig.key + "\n")
    names = [m["name"] for m in api_get(rig.keyed, "/v1/models", rig.key).json()["data"]]
    wait_for(lambda: shown_models(driver) == names, timeout=WAIT, what="the models, fetched with the key")
    assert not visible(driver, "key-prompt")
    stored = driver.execute_script(
        "return [sessionStorage.getItem('predq.apiKey'), localStorage.length, document.cookie]")
    assert stored == [rig.key, 0, ""]

    # An upload and both downloads send the key.
    submit_upload(driver, upload_csv(tmp_path / "keyed.csv", 30, bad_row=3))
    message = upload_message(driver, after="")
    job_id = message.split()[1]
    assert job_id.startswith("job_"), message
    shown = wait_terminal(driver, job_id)
    job = api_get(rig.keyed, f"/v1/jobs/{job_id}", rig.key).json()
    assert shown["status"] == job["status"] == "partially_succeeded"
    assert_counts_match(shown, job)
    for kind in ("results", "errors"):
        driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] a.download-{kind}').click()
        expected = api_get(rig.keyed, f"/v1/jobs/{job_id}/{kind}?format=csv", rig.key).content
        saved = driver.downloads / f"{job_id}-{kind}.csv"
        wait_for(lambda: saved.exists() and saved.read_bytes() == expected, timeout=WAIT,
                 what=f"{saved.name} to be saved with the API's bytes")
    assert len(pd.read_csv(driver.downloads / f"{job_id}-errors.csv")) == 1

    # A key that stops working mid-session brings the prompt back and is forgotten.
    driver.execute_script("sessionStorage.setItem('predq.apiKey', 'pq_revoked')")
    driver.find_element(By.ID, "jobs-refresh").click()
    wait_for(lambda: visible(driver, "key-prompt") and driver.find_element(By.ID, "key-message").text == refused,
             timeout=WAIT, what="the prompt after a 401")
    assert not visible(driver, "content")
    assert driver.execute_script("return sessionStorage.getItem('predq.apiKey')") is None

    # A key without the models' scope: the prompt shows the 403's message, and what the key may see still shows.
    forbidden = api_get(rig.keyed, "/v1/models", rig.jobs_key).json()["error"]["message"]
    driver.find_element(By.ID, "key-input").send_keys(rig.jobs_key + "\n")
    wait_for(lambda: visible(driver, "key-prompt") and driver.find_element(By.ID, "key-message").text == forbidden,
             timeout=WAIT, what="the prompt with the 403's message")
    wait_for(lambda: visible(driver, "jobs-empty"), timeout=WAIT, what="the key's (empty) list of jobs")
    assert driver.execute_script("return sessionStorage.getItem('predq.apiKey')") == rig.jobs_key
