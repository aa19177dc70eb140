"""Chaos benchmark: one batch job run twice, undisturbed and under worker kills and a Redis crash; every row counted.

    .venv/bin/python bench/chaos.py [--rows N] [--chunk-size ROWS] [--kill-every SECONDS] [--redis-at FRACTION]
                                    [--redis-down SECONDS] [--timeout SECONDS] [--data PATH] [--keep] [--seed N]
                                    [--kill-seed N]

Each run starts from scratch: a private append-only Redis-compatible server, the Procfile's `web` and `beat`
lines and two processes of its `worker` line (WORKER_CONCURRENCY=1 each), with short recovery settings. The CSV
is uploaded; once the API has answered 202 (every chunk is stored by then) the two workers are started and, in
the chaos run, a random worker's whole process group is SIGKILLed every --kill-every seconds and replaced at once,
and the Redis server is SIGKILLed once (when --redis-at of the rows have succeeded) and restarted on the same port
and directory --redis-down seconds later. Both runs end with the results and errors downloaded and checked row by
row against an in-process `model.predict` of the same CSV.

See bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `python bench/chaos.py`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import orjson
import pyarrow.parquet as pq
import requests

from bench.batch import (
    JobPoller,
    MiB,
    MultipartBody,
    ProcfileWeb,
    ProcfileWorker,
    _problem_lines,
    _read_json_lines,
    data_arguments,
    download,
    log,
    prepare,
    run_in_process,
    workdir,
)
from cli.stack import procfile
from shared import keys
from tests.support.processes import RedisServer

#: In the environment of every process of both runs: lost work comes back within seconds, not minutes.
RECOVERY = {
    "VISIBILITY_TIMEOUT": "10",         # below 3 x CHUNK_TIME_LIMIT: each process logs a warning, counting stays exact
    "UNACKED_RESTORE_INTERVAL": "1",
    "STALE_CHUNK_SECONDS": "10",
    "RECONCILE_INTERVAL": "2",
    "HEARTBEAT_INTERVAL": "1",
}
WORKERS = 2                 # processes of the Procfile's `worker` line, alive at any time
WORKER_CONCURRENCY = "1"    # pool processes in each: two single-process workers on a 2-core machine
DOWNLOAD_ATTEMPTS = 5
BROKER_UNACKED = "unacked"  # kombu's Redis transport: hash of the messages delivered and not yet acknowledged
_READY = re.compile(r'"message":"\S+@\S+ ready\."')


def _seconds_of_day(hms: str) -> int:
    h, m, sec = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + int(sec[:2])


# --------------------------------------------------------------------------------------------------
# The processes: the Procfile's lines, one log file each
# --------------------------------------------------------------------------------------------------

class Worker(ProcfileWorker):
    """The Procfile's `worker` line, logging to its own file (every replacement gets a new one)."""

    def __init__(self, *args: Any, log_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_path = os.path.join(os.path.dirname(self.log_path), log_name)
        self.started_at: float | None = None

    def start(self, *, wait_ready: bool = True) -> Worker:
        self.started_at = time.perf_counter()
        super().start(wait_ready=wait_ready)
        return self

    def committed(self) -> int:
        return self.log().count('"message":"chunk committed"')

    def startup_seconds(self) -> float | None:
        """Launch -> 'ready.' from the log's timestamps (whole seconds), or None if it never got ready."""
        launched = ready = None
        for line in self.log().splitlines():
            if launched is None and line.startswith("===== ") and " starting: " in line:
                launched = _seconds_of_day(line.split()[1])
            elif ready is None and line.startswith("{") and _READY.search(line):
                ready = _seconds_of_day(orjson.loads(line)["time"].rsplit("T", 1)[-1])
        if launched is None or ready is None:
            return None
        return (ready - launched) % 86400


class ProcfileBeat(ProcfileWorker):
    """The Procfile's `beat` line (the reconciler's scheduler)."""

    kind = "beat"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_path = os.path.join(os.path.dirname(self.log_path), "beat.log")

    def command(self) -> list[str]:
        return ["bash", "-c", procfile(REPO_ROOT / "Procfile")["beat"]]

    def is_ready(self) -> bool:
        return "beat: Starting..." in self._current_log()


class Stack:
    """One run's server and processes; workers are replaced in their slot when killed."""

    def __init__(self, run_dir: Path, models_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.models_dir = models_dir
        self.server = RedisServer(appendonly=True, dir=str(run_dir / "redis"))
        self.web: ProcfileWeb | None = None
        self.beat: ProcfileBeat | None = None
        self.slots: list[Worker] = []
        self.all_workers: list[Worker] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        self.server.start()
        log(f"redis-compatible server on port {self.server.port} (pid {self.server.pid}), append-only, "
            f"dir {self.server.dir}")
        self.web = ProcfileWeb(self.server.url, models_dir=str(self.models_dir), log_dir=str(self.logs),
                               env=dict(RECOVERY))
        self.web.start()
        log(f"web: {self.web.url} (gunicorn master pid {self.web.pid}, workers {self.web.worker_pids()})")
        self.beat = ProcfileBeat(self.server.url, models_dir=str(self.models_dir), log_dir=str(self.logs),
                                 env=dict(RECOVERY))
        self.beat.start()
        log(f"beat: pid {self.beat.pid}")

    def new_worker(self) -> Worker:
        worker = Worker(self.server.url, models_dir=str(self.models_dir), log_dir=str(self.logs),
                        env={**RECOVERY, "WORKER_CONCURRENCY": WORKER_CONCURRENCY},
                        log_name=f"worker-{len(self.all_workers) + 1}.log")
        self.all_workers.append(worker)
        worker.start(wait_ready=False)
        return worker

    def start_workers(self) -> None:
        with self.lock:
            self.slots = [self.new_worker() for _ in range(WORKERS)]

    def replace_worker(self, slot: int) -> tuple[Worker, Worker]:
        """SIGKILL the whole process group of the worker in `slot`, then start its replacement at once."""
        with self.lock:
            victim = self.slots[slot]
            victim.kill(signal.SIGKILL)
            self.slots[slot] = self.new_worker()
            return victim, self.slots[slot]

    def processes(self) -> list:
        return [*self.all_workers, self.beat, self.web, self.server]

    def stop(self) -> None:
        for proc in self.processes():
            if proc is None:
                continue
            try:
                proc.stop()
            except Exception as e:  # noqa: BLE001 - stop the rest anyway
                log(f"stopping {proc!r} failed: {e!r}")
                try:
                    proc.kill()
                except Exception as e2:  # noqa: BLE001
                    log(f"killing {proc!r} failed: {e2!r}")


# --------------------------------------------------------------------------------------------------
# Chaos
# --------------------------------------------------------------------------------------------------

class WorkerKiller(threading.Thread):
    """Every `every` seconds: SIGKILL a random worker's process group and start its replacement."""

    def __init__(self, stack: Stack, every: float, rng: random.Random, t0: float) -> None:
        super().__init__(name="worker-killer", daemon=True)
        self.stack, self.every, self.rng, self.t0 = stack, every, rng, t0
        self.kills: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def run(self) -> None:
        next_at = time.perf_counter() + self.every
        while not self._halt.wait(max(0.0, next_at - time.perf_counter())):
            next_at += self.every
            slot = self.rng.randrange(len(self.stack.slots))
            at = time.perf_counter()
            try:
                victim, replacement = self.stack.replace_worker(slot)
            except Exception as e:  # noqa: BLE001 - keep the chaos going; reported at the end
                self.errors.append(f"t={at - self.t0:.1f}s slot {slot}: {e!r}")
                continue
            self.kills.append({"t": at - self.t0, "slot": slot, "pid": victim.pid, "ready": victim.is_ready(),
                               "age": at - (victim.started_at or at), "committed": victim.committed(),
                               "replacement": replacement.pid})


class RedisCrasher(threading.Thread):
    """Once `fraction` of the rows have succeeded: SIGKILL the server, restart it `down` seconds later."""

    def __init__(self, stack: Stack, poller: JobPoller, total: int, fraction: float, down: float, t0: float) -> None:
        super().__init__(name="redis-crasher", daemon=True)
        self.stack, self.poller, self.total = stack, poller, total
        self.fraction, self.down, self.t0 = fraction, down, t0
        self.events: list[str] = []
        self.restarts = 0
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(120)

    def run(self) -> None:
        server = self.stack.server
        while not self._halt.wait(0.1):
            sample = self.poller.samples[-1] if self.poller.samples else None
            if sample is None or sample[2] < self.fraction * self.total:
                continue
            try:
                killed_at = time.perf_counter()
                pid = server.pid
                server.kill(signal.SIGKILL)
                self.events.append(f"t={killed_at - self.t0:.1f}s: SIGKILL to the server (pid {pid}) with "
                                   f"{sample[2]:,} rows succeeded ({sample[2] / self.total:.0%})")
                log(self.events[-1])
                time.sleep(self.down)
                server.restart()
                up_at = time.perf_counter()
                self.restarts += 1
                self.events.append(f"t={up_at - self.t0:.1f}s: server restarted on port {server.port} "
                                   f"(pid {server.pid}), down {up_at - killed_at:.1f} s")
                log(self.events[-1])
            except Exception as e:  # noqa: BLE001 - reported at the end
                self.errors.append(repr(e))
                log(f"the Redis crash failed: {e!r}")
            return


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------

def _get_with_retries(session: requests.Session, url: str, dest: Path) -> tuple[float, int, int]:
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return download(session, url, dest)
        except (requests.RequestException, RuntimeError) as e:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise
            log(f"GET {url} failed ({e!r}); retrying")
            time.sleep(1)
    raise AssertionError("unreachable")


def _decode(h: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode("utf-8", "replace") for k, v in h.items()}


def job_state(client, job_id: str) -> dict[str, Any]:
    """The job's Redis hash and the sizes of its other keys, and the broker's queues (for diagnosis)."""
    state: dict[str, Any] = {"hash": _decode(client.hgetall(keys.job(job_id)))}
    state["chunks"] = client.hlen(keys.chunks(job_id))
    state["inputs left"] = sorted(int(i) for i in client.hkeys(keys.inputs(job_id)))
    state["done"] = client.scard(keys.done(job_id))
    state["running"] = _decode(client.hgetall(keys.running(job_id)))
    state["attempts"] = _decode(client.hgetall(keys.attempts(job_id)))
    state["results blobs"] = client.hlen(keys.results(job_id))
    state["errors blobs"] = client.hlen(keys.errors(job_id))
    state["chunk queue length"] = client.llen(os.environ.get("CHUNK_QUEUE", "predq.chunks"))
    state["broker unacked"] = client.hlen(BROKER_UNACKED)
    return state


def check_rows(results_path: Path, errors_path: Path, expected: np.ndarray) -> dict[str, Any]:
    """Rows in the downloads against the input: lost, duplicated, and predictions against the in-process ones."""
    total = len(expected)
    table = pq.read_table(results_path)
    rows = table.column("row").to_numpy()
    predictions = table.column("prediction").to_numpy(zero_copy_only=False)
    ok_rows = np.unique(rows)
    err_rows_list = []
    err_codes: Counter[str] = Counter()
    with open(errors_path, "rb") as fh:
        for line in fh:
            if line.strip():
                entry = orjson.loads(line)
                err_rows_list.append(entry["row"])
                err_codes[entry["code"]] += 1
    err_rows_all = np.asarray(err_rows_list, dtype=np.int64)
    err_rows = np.unique(err_rows_all)
    out_of_range = int(((rows < 0) | (rows >= total)).sum() + ((err_rows < 0) | (err_rows >= total)).sum())
    in_range = (rows >= 0) & (rows < total)
    want = expected[rows[in_range]]
    got = predictions[in_range]
    if want.dtype.kind != got.dtype.kind:
        want, got = want.astype(str), got.astype(str)
    mismatched = int((want != got).sum())
    missing = total - len(ok_rows[(ok_rows >= 0) & (ok_rows < total)])
    return {
        "result_rows": len(rows), "distinct_ok": len(ok_rows), "error_rows": len(err_rows_all),
        "distinct_failed": len(err_rows), "error_codes": dict(err_codes),
        "lost": total - (len(ok_rows) + len(err_rows)),
        "duplicated": len(rows) - len(ok_rows),
        "duplicated_errors": len(err_rows_all) - len(err_rows),
        "in_both": len(np.intersect1d(ok_rows, err_rows)),
        "out_of_range": out_of_range, "mismatched": mismatched, "without_result": missing,
        "predictions_equal": mismatched == 0 and missing == 0 and out_of_range == 0,
    }


def run(label: str, chaos: bool, args: argparse.Namespace, tmp: Path, models_dir: Path, data: Path, rows: int,
        expected: np.ndarray) -> dict[str, Any]:
    run_dir = tmp / label
    stack = Stack(run_dir, models_dir)
    out: dict[str, Any] = {"label": label, "chaos": chaos, "kills": [], "restarts": 0, "events": []}
    killer: WorkerKiller | None = None
    crasher: RedisCrasher | None = None
    poller: JobPoller | None = None
    try:
        stack.start()
        client = stack.server.client(socket_timeout=30)
        assert stack.web is not None and stack.beat is not None
        out["server_version"] = (client.info("server").get("valkey_version")
                                 or client.info("server")["redis_version"])

        body = MultipartBody(data, {"model": args.model, "chunk_size": str(args.chunk_size)})
        session = requests.Session()
        log(f"[{label}] uploading {body.length / MiB:.1f} MiB ({rows:,} rows, chunk_size {args.chunk_size})")
        r = session.post(f"{stack.web.url}/v1/jobs", data=body, headers={"Content-Type": body.content_type},
                         timeout=(30, 3600))
        accepted_at = time.perf_counter()
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs -> {r.status_code}: {r.text[:1000]}")
        job = r.json()
        job_id = job["id"]
        first = body.first_byte_at
        assert first is not None
        out.update({"job_id": job_id, "first": first, "accepted": accepted_at, "job_at_202": job})
        log(f"[{label}] 202 after {accepted_at - first:.1f} s: {job_id}, total {job['counts']['total']:,}; "
            f"starting {WORKERS} workers" + (" and the chaos" if chaos else ""))

        stack.start_workers()
        poller = JobPoller(stack.web.url, client)
        poller.job_id = job_id
        poller.start()
        if chaos:
            killer = WorkerKiller(stack, args.kill_every, random.Random(args.kill_seed), accepted_at)
            crasher = RedisCrasher(stack, poller, rows, args.redis_at, args.redis_down, accepted_at)
            killer.start()
            crasher.start()

        deadline = accepted_at + args.timeout
        while not poller.done.wait(5):
            if not poller.is_alive():
                raise RuntimeError(f"the poller stopped: {poller.errors[-3:]}")
            s = poller.samples[-1] if poller.samples else None
            kills = len(killer.kills) if killer else 0
            if s:
                log(f"[{label}]   t={s[0] - accepted_at:6.1f}s after the 202: status={s[3]} "
                    f"succeeded={s[2]:,} worker kills={kills} poll errors={len(poller.errors)}")
            if time.perf_counter() > deadline:
                log(f"[{label}] NOT terminal {args.timeout:.0f} s after the 202; giving up")
                break
        if killer:
            killer.stop()
        if crasher:
            crasher.stop()
        poller.stop()
        terminal = poller.terminal_job
        out["terminal"] = poller.terminal_at
        out["job"] = terminal
        out["poll_errors"] = list(poller.errors)
        out["samples"] = list(poller.samples)
        if killer:
            out["kills"], out["kill_errors"] = killer.kills, killer.errors
        if crasher:
            out["restarts"], out["events"], out["crash_errors"] = crasher.restarts, crasher.events, crasher.errors
        if terminal is not None:
            log(f"[{label}] terminal {poller.terminal_at - first:.1f} s after the first byte: {terminal['status']} "
                f"counts={terminal['counts']}")

        out["state"] = job_state(client, job_id)
        if terminal is None:
            try:
                r = session.get(f"{stack.web.url}/v1/jobs/{job_id}", timeout=30)
                out["job"] = r.json() if r.status_code == 200 else None
            except requests.RequestException:
                pass
        partial = "" if terminal is not None else "&partial=true"
        res_path, err_path = run_dir / "results.parquet", run_dir / "errors.jsonl"
        _get_with_retries(session, f"{stack.web.url}/v1/jobs/{job_id}/results?format=parquet{partial}", res_path)
        _get_with_retries(session, f"{stack.web.url}/v1/jobs/{job_id}/errors?format=jsonl{partial}", err_path)
        out["check"] = check_rows(res_path, err_path, expected)
        log(f"[{label}] downloads: {out['check']}")
        return out
    except Exception:
        for proc in stack.processes():
            if isinstance(proc, (ProcfileWeb, ProcfileWorker)) and proc.log_path and os.path.exists(proc.log_path):
                log(f"last lines of {proc.log_path}:\n{proc.log_tail(20)}")
        raise
    finally:
        for thread in (killer, crasher, poller):
            if thread is not None:
                try:
                    thread.stop()
                except Exception as e:  # noqa: BLE001 - stop the processes anyway
                    log(f"stopping {thread.name} failed: {e!r}")
        out["logs"] = summarise_logs(stack)
        stack.stop()


def summarise_logs(stack: Stack) -> dict[str, Any]:
    """What the workers and beat said: chunk outcomes, re-sends, warnings and errors."""
    outcomes: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    problems: list[tuple[str, str]] = []
    problem_count = 0
    ready = 0
    startup = []
    for worker in stack.all_workers:
        if worker.is_ready():
            ready += 1
        seconds = worker.startup_seconds()
        if seconds is not None:
            startup.append(seconds)
        for entry in _read_json_lines(worker.log_path):
            if entry.get("message") == "chunk committed":
                outcomes[str(entry.get("outcome"))] += 1
            if entry.get("level") in ("warning", "error", "critical"):
                text = " ".join(str(entry.get("message")).split())[:150]
                messages[f"{entry.get('level')}: {text}"] += 1
        n, lines = _problem_lines(worker.log_path, limit=5)
        problem_count += n
        problems += [(Path(worker.log_path).name, line) for line in lines]
    beat_messages: Counter[str] = Counter()
    beat_lines: list[str] = []
    reconciles: list[str] = []
    redirected = 0
    if stack.beat is not None:
        for entry in _read_json_lines(stack.beat.log_path):
            text = " ".join(str(entry.get("message")).split())
            if text.startswith("Scheduler: Sending due task reconcile"):
                reconciles.append(str(entry.get("time")))
            if entry.get("logger") == "celery.redirected":  # stderr, line by line (a traceback printed again)
                redirected += 1
            elif entry.get("level") in ("warning", "error", "critical"):
                if entry.get("exception"):
                    text += " | " + str(entry["exception"]).strip().splitlines()[-1]
                beat_lines.append(f"{entry.get('time')} {entry.get('level')}: {text[:400]}")
                beat_messages[f"{entry.get('level')}: {text[:250]}"] += 1
    return {"outcomes": dict(outcomes), "messages": dict(messages), "problem_count": problem_count,
            "problems": problems, "workers_started": len(stack.all_workers), "workers_ready": ready,
            "startup": sorted(startup),
            "beat_lines": beat_lines, "beat_messages": dict(beat_messages), "logs_dir": str(stack.logs),
            "beat_alive": stack.beat is not None and stack.beat.running, "reconciles": reconciles,
            "beat_returncode": stack.beat.returncode if stack.beat is not None else None,
            "beat_redirected": redirected}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

def _wall(run_: dict[str, Any]) -> float | None:
    return None if run_.get("terminal") is None else run_["terminal"] - run_["first"]


def report(args: argparse.Namespace, rows: int, data: Path, runs: list[dict[str, Any]],
           load_before: tuple[float, float, float]) -> list[str]:
    import celery

    problems: list[str] = []
    base = _wall(runs[0]) if runs else None
    print()
    print(f"## predq chaos benchmark: {args.model}, {rows:,} rows, CSV {data.stat().st_size / MiB:.1f} MiB, "
          f"chunk_size {args.chunk_size:,}")
    print()

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], check=False, capture_output=True, text=True, cwd=REPO_ROOT).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
    print(f"predq at commit {git('rev-parse', '--short', 'HEAD').strip() or '?'}"
          + (f", with uncommitted changes to {', '.join(d[3:] for d in dirty)}" if dirty else "")
          + f"; celery {celery.__version__}, server {runs[0].get('server_version') if runs else '?'}")
    print(f"nproc {os.cpu_count()}; load average before the run {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}; {WORKERS} workers x WORKER_CONCURRENCY={WORKER_CONCURRENCY}, started after the "
          f"202; chaos: a random worker (--kill-seed {args.kill_seed}) killed every {args.kill_every:g} s, Redis killed at {args.redis_at:.0%} of rows "
          f"succeeded and restarted {args.redis_down:g} s later; "
          + ", ".join(f"{k}={v}" for k, v in RECOVERY.items()))
    print()
    print("| run | worker kills | Redis restarts | rows lost | rows duplicated | predictions equal in-process "
          "| status | wall s | vs undisturbed |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    for run_ in runs:
        check = run_.get("check") or {}
        job = run_.get("job") or {}
        status = job.get("status", "?")
        wall = _wall(run_)
        if wall is None:
            status = f"**not terminal** after {args.timeout:.0f} s ({status})"
        if check:
            eq = "yes" if check["predictions_equal"] else (
                f"**no**: {check['mismatched']:,} differ, {check['without_result']:,} rows without a result")
        else:
            eq = "?"
        ratio = f"{wall / base:.2f}x" if wall is not None and base else "-"
        lost = f"{check['lost']:,}" if check else "?"
        dup = f"{check['duplicated']:,}" if check else "?"
        if check and check["lost"]:
            lost = f"**{lost}**"
        if check and check["duplicated"]:
            dup = f"**{dup}**"
        print(f"| {run_['label']} | {len(run_['kills'])} | {run_['restarts']} | {lost} | {dup} | {eq} | {status} "
              f"| {f'{wall:.1f}' if wall is not None else '-'} | {ratio} |")
    print()
    print("wall s: first byte of the upload -> terminal status (polled every 0.2 s); it includes the upload and "
          "the start of the workers after the 202. rows lost = total - (distinct succeeded rows + distinct failed "
          "rows); rows duplicated = result rows - distinct result rows.")

    for run_ in runs:
        label = run_["label"]
        check = run_.get("check") or {}
        job = run_.get("job") or {}
        print()
        print(f"### {label}")
        print()
        wall = _wall(run_)
        after = (run_["terminal"] - run_["accepted"]) if wall is not None else None
        print(f"- job {run_.get('job_id')}: first byte -> 202 {run_['accepted'] - run_['first']:.1f} s; 202 -> "
              f"terminal {f'{after:.1f} s' if after is not None else 'never'}; status {job.get('status')}, "
              f"counts {job.get('counts')}")
        if check:
            print(f"- downloads: {check['result_rows']:,} result rows ({check['distinct_ok']:,} distinct), "
                  f"{check['error_rows']:,} error rows ({check['distinct_failed']:,} distinct, codes "
                  f"{check['error_codes'] or '{}'}); rows in both {check['in_both']:,}; rows out of range "
                  f"{check['out_of_range']:,}; predictions differing from in-process {check['mismatched']:,}")
        logs = run_.get("logs") or {}
        if logs:
            startup = logs["startup"]
            took = (f", {min(startup):.0f}-{max(startup):.0f} s from launch to 'ready.' (log timestamps, whole "
                    f"seconds)" if startup else "")
            print(f"- workers started {logs['workers_started']} ({logs['workers_ready']} logged 'ready.'{took}); "
                  f"'chunk committed' outcomes {logs['outcomes']}")
            if logs["messages"]:
                print("- worker warnings/errors (JSON log lines, by message): "
                      + "; ".join(f"{n} x {m}" for m, n in sorted(logs["messages"].items(), key=lambda kv: -kv[1])))
            sent = logs["reconciles"]
            state = "running" if logs["beat_alive"] else f"**exited** (status {logs['beat_returncode']})"
            print(f"- beat: {state} at the end; sent the reconciler {len(sent)} times"
                  + (f", {sent[0][11:]} to {sent[-1][11:]}" if sent else "")
                  + (f"; {logs['beat_redirected']} lines of stderr redirected to its log" if logs["beat_redirected"]
                     else ""))
            if logs["beat_messages"]:
                print("- beat warnings/errors (by message): "
                      + "; ".join(f"{n} x {m}" for m, n in logs["beat_messages"].items()))
        for event in run_.get("events", []):
            print(f"- Redis: {event} (t after the 202)")
        if run_["kills"]:
            ready = sum(1 for k in run_["kills"] if k["ready"])
            print(f"- worker kills: {len(run_['kills'])} (t after the 202, slot, victim's age, ready or not: "
                  + ", ".join(f"{k['t']:.0f} s #{k['slot']} {k['age']:.0f} s {'ready' if k['ready'] else 'starting'}"
                              for k in run_["kills"])
                  + f"); {ready} of the victims had logged 'ready.', the others were still starting; chunks "
                  f"committed by each victim: {[k['committed'] for k in run_['kills']]}")
        for key in ("kill_errors", "crash_errors"):
            if run_.get(key):
                print(f"- {key.replace('_', ' ')}: {run_[key][:5]}")
        if run_.get("poll_errors"):
            print(f"- status polls that failed (retried every 0.2 s): {len(run_['poll_errors'])}, e.g. "
                  f"{run_['poll_errors'][0][:200]}")

        bad = []
        if wall is None:
            bad.append(f"the job was not terminal {args.timeout:.0f} s after the 202")
        if check and check["lost"]:
            bad.append(f"{check['lost']:,} rows lost")
        if check and check["duplicated"]:
            bad.append(f"{check['duplicated']:,} result rows duplicated")
        if check and (check["duplicated_errors"] or check["in_both"] or check["out_of_range"]):
            bad.append(f"error rows duplicated {check['duplicated_errors']}, rows both succeeded and failed "
                       f"{check['in_both']}, rows out of range {check['out_of_range']}")
        if check and check["mismatched"]:
            bad.append(f"{check['mismatched']:,} predictions differ from in-process")
        if logs and not logs["beat_alive"]:
            last = logs["reconciles"][-1][11:] if logs["reconciles"] else "never"
            bad.append(f"beat exited (status {logs['beat_returncode']}; the reconciler last sent at {last}): "
                       + "; ".join(line for line in logs["beat_lines"] if " critical: " in line or " error: " in line)[:600])
        if job and job.get("counts") and check and wall is not None:
            c = job["counts"]
            if (c["succeeded"], c["failed"]) != (check["distinct_ok"], check["distinct_failed"]):
                bad.append(f"the job's counts {c} disagree with the downloads ({check['distinct_ok']} succeeded, "
                           f"{check['distinct_failed']} failed)")
        if bad or not run_.get("check") or job.get("status") != "succeeded":
            state = run_.get("state") or {}
            print(f"- job's Redis hash `predq:job:{{{run_.get('job_id')}}}`: {state.get('hash')}")
            print("- its other keys: " + ", ".join(f"{k} {v}" for k, v in state.items() if k != "hash"))
            if logs.get("problems"):
                print("- first warning/error lines of the worker logs:")
                for name, line in logs["problems"][:12]:
                    print(f"    {name}: {line}")
            if logs.get("beat_lines"):
                print("- first warning/error lines of the beat log:")
                for line in logs["beat_lines"][:8]:
                    print(f"    {line}")
        if bad:
            problems.append(f"{label}: " + "; ".join(bad))
    if problems:
        print()
        print("**SERVICE PROBLEMS:** " + " / ".join(problems))
    return problems


# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data_arguments(parser)
    parser.add_argument("--chunk-size", type=int, default=20_000, help="rows per chunk (default 20,000)")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between worker kills (default 3)")
    parser.add_argument("--redis-at", type=float, default=0.4,
                        help="fraction of rows succeeded at which Redis is killed (default 0.4)")
    parser.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis stays down (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds after the 202 before a run is given up as not terminal (default 900)")
    parser.add_argument("--kill-seed", type=int, default=0, help="seed of the order in which workers are killed")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    try:
        with workdir("predq-chaos-", args.keep) as tmp:
            models_dir, data, rows = prepare(tmp, args.model, args.rows, args.seed, args.data)

            inproc = run_in_process(models_dir, args.model, data, tmp / "inprocess.parquet")
            table = pq.read_table(tmp / "inprocess.parquet")
            if inproc["rows"] != rows or table.column("row").to_numpy().tolist() != list(range(rows)):
                raise RuntimeError(f"the in-process predictions have {inproc['rows']} rows, expected {rows}")
            expected = table.column("prediction").to_numpy(zero_copy_only=False)
            log(f"in-process predictions: {rows:,} rows in {inproc['total']:.1f} s")

            runs = []
            for label, chaos in (("undisturbed", False), ("chaos", True)):
                log(f"--- {label} ---")
                runs.append(run(label, chaos, args, tmp, models_dir, data, rows, expected))
            problems = report(args, rows, data, runs, load_before)
            return 1 if problems else 0
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
