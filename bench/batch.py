"""Batch benchmark: one CSV scored in-process (the limit) and through predq end to end, side by side.

    .venv/bin/python bench/batch.py [--rows N] [--model hgb20|breast_cancer|diabetes] [--data PATH]
                                    [--chunk-size ROWS] [--keep]

1. In-process limit: pandas.read_csv(engine="pyarrow") + model.predict + Parquet write, in one fresh process.
2. predq end to end: a private Redis-compatible server, the API and ONE worker started exactly as the Procfile's
   `web` and `worker` lines, the CSV uploaded as a streamed multipart body, the job polled to its terminal
   status, then the results downloaded as Parquet and as JSON Lines.
3. Memory: peak RSS of every API and worker process, Redis memory, the size of the stored results.

See bench/README.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `python bench/batch.py`
    sys.path.insert(0, str(REPO_ROOT))

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import redis
import requests
import sklearn

from cli.stack import procfile
from shared import keys
from shared.demo import install_demo_models
from shared.registry import Registry
from tests.support.processes import ApiServer, CeleryWorker, MotoServer, RedisServer

MiB = 1024 * 1024
POLL_SECONDS = 0.05  # GET /v1/jobs/{id} once the 202 named the job: the terminal status is seen within this
LIST_POLL_SECONDS = 0.2  # GET /v1/jobs?limit=1 before it (a listing costs more than a status)
SAMPLE_SECONDS = 0.2
NOISE = 0.02            # gaussian noise, as a fraction of each feature's standard deviation
SIGNIFICANT_DIGITS = 6  # values are written with about this many significant digits
GEN_BLOCK = 100_000     # rows generated and written at a time
TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
DOWNLOADS = 3           # each download (and its in-process limit) is timed this many times; the median is reported


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Input data
# --------------------------------------------------------------------------------------------------

HGB20 = "hgb20"  # HistGradientBoostingClassifier on 20 gaussian features f0..f19, y = f0 + f1 > 0
MODELS = (HGB20, "breast_cancer", "diabetes")


def hgb20_frame(rows: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.standard_normal((rows, 20)), columns=[f"f{i}" for i in range(20)])


def install_hgb20(models_dir: Path) -> None:
    """The benchmark's reference model: 20 numeric features, 100 boosting iterations."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame = hgb20_frame()
    model = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(frame, (frame.f0 + frame.f1 > 0).astype(int))
    target = models_dir / HGB20 / "v1"
    target.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, target / "model.joblib")


def source_frame(model: str) -> pd.DataFrame:
    """The data a benchmark model was trained on."""
    from sklearn.datasets import load_breast_cancer, load_diabetes

    loaders = {HGB20: hgb20_frame, "breast_cancer": lambda: load_breast_cancer(as_frame=True).data,
               "diabetes": lambda: load_diabetes(as_frame=True).data}
    if model not in loaders:
        raise SystemExit(f"--model must be one of {', '.join(loaders)}")
    return loaders[model]()


def generate_csv(path: Path, model: str, features: list[str], rows: int, seed: int) -> None:
    """Rows sampled from the real dataset plus small seeded gaussian noise, written block by block."""
    base = source_frame(model)[features].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    scale = base.std(axis=0) * NOISE
    magnitude = np.floor(np.log10(np.maximum(np.abs(base).max(axis=0), 1e-12)))
    decimals = (SIGNIFICANT_DIGITS - 1 - magnitude).astype(int)
    schema = pa.schema([(name, pa.float64()) for name in features])
    tmp = path.with_name(path.name + ".part")
    with pacsv.CSVWriter(str(tmp), schema) as writer:
        for start in range(0, rows, GEN_BLOCK):
            n = min(GEN_BLOCK, rows - start)
            values = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, len(features))) * scale
            for j, d in enumerate(decimals):
                values[:, j] = np.round(values[:, j], int(d))
            writer.write_table(pa.Table.from_arrays([pa.array(values[:, j]) for j in range(len(features))],
                                                    schema=schema))
    tmp.replace(path)


def count_data_rows(path: Path) -> int:
    """Lines after the header (the generated files have no quoted line breaks)."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(8 * MiB):
            lines += block.count(b"\n")
            last = block[-1:]
    if last != b"\n":
        lines += 1
    return lines - 1


# --------------------------------------------------------------------------------------------------
# 1. In-process limit (run in a fresh process so that its peak RSS is its own)
# --------------------------------------------------------------------------------------------------

def in_process(models_dir: str, model: str, data: str, out: str) -> dict[str, Any]:
    mv = Registry(models_dir).get(model)
    features = [f.name for f in mv.features]
    t0 = time.perf_counter()
    frame = pd.read_parquet(data) if data.endswith(".parquet") else pd.read_csv(data, engine="pyarrow")
    t1 = time.perf_counter()
    predictions = mv.estimator.predict(frame[features])
    t2 = time.perf_counter()
    table = pa.table({"row": pa.array(np.arange(len(frame), dtype=np.int64)), "prediction": pa.array(predictions)})
    pq.write_table(table, out, compression="zstd")
    t3 = time.perf_counter()
    # The download limits: the results read back and written in each download format, in process (median).
    def timed(write) -> float:
        times = []
        for _ in range(DOWNLOADS):
            start = time.perf_counter()
            write(pd.read_parquet(out))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    results_parquet = timed(lambda f: f.to_parquet(out + ".copy.parquet", compression="zstd"))
    results_jsonl = timed(lambda f: f.to_json(out + ".jsonl", orient="records", lines=True))
    return {"rows": len(frame), "read_csv": t1 - t0, "predict": t2 - t1, "write_parquet": t3 - t2, "total": t3 - t0,
            "results_parquet": results_parquet, "results_jsonl": results_jsonl,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "parquet_bytes": os.path.getsize(out)}


def run_in_process(models_dir: Path, model: str, data: Path, out: Path) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(in_process, (str(models_dir), model, str(data), str(out)))


# --------------------------------------------------------------------------------------------------
# 2. The service, exactly as the Procfile runs it
# --------------------------------------------------------------------------------------------------

def _procfile_env(env: dict[str, str]) -> dict[str, str]:
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's gunicorn/celery
    return env


class ProcfileWeb(ApiServer):
    """The Procfile's `web` line through bash, with PORT/REDIS_URL/MODELS_DIR in its environment."""

    kind = "web"

    def command(self) -> list[str]:
        return ["bash", "-c", procfile(REPO_ROOT / "Procfile")["web"]]

    def environment(self) -> dict[str, str]:
        env = _procfile_env(super().environment())
        env["PORT"] = str(self.port)
        env["HOST"] = "127.0.0.1"
        # gunicorn's control socket (when enabled) goes to $XDG_RUNTIME_DIR: keep it private to this run.
        env["XDG_RUNTIME_DIR"] = self._log_dir
        return env


class ProcfileWorker(CeleryWorker):
    """The Procfile's `worker` line through bash."""

    kind = "worker"

    def command(self) -> list[str]:
        return ["bash", "-c", procfile(REPO_ROOT / "Procfile")["worker"]]

    def environment(self) -> dict[str, str]:
        env = _procfile_env(super().environment())
        if self.pool_processes:
            env["WORKER_CONCURRENCY"] = str(self.pool_processes)
        return env

    pool_processes: int | None = None  # None: the Procfile's default


class MultipartBody:
    """A multipart/form-data body (fields first, then the file) read from disk block by block.

    It has a length, so the request carries a Content-Length and is sent as is, not chunked.
    """

    def __init__(self, path: Path, fields: dict[str, str], block: int = 1 * MiB):
        self.boundary = f"predq-bench-{uuid.uuid4().hex}"
        parts = [f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                 for k, v in fields.items()]
        parts.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{path.name}"\r\nContent-Type: text/csv\r\n\r\n')
        self._head = "".join(parts).encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._path = path
        self._block = block
        self.length = len(self._head) + path.stat().st_size + len(self._tail)
        self.first_byte_at: float | None = None
        self.last_byte_at: float | None = None

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        # The request line and headers go out just before the body's first block is asked for.
        self.first_byte_at = time.perf_counter()
        yield self._head
        with open(self._path, "rb") as fh:
            while block := fh.read(self._block):
                yield block
        yield self._tail
        self.last_byte_at = time.perf_counter()


class JobPoller(threading.Thread):
    """Samples the job: the API's view (status, counts) and the rows the API has ingested so far.

    Before the 202 the job id is not known yet, so the newest job of the (private) server is listed every
    LIST_POLL_SECONDS; after it, the job's status is read every POLL_SECONDS.
    """

    def __init__(self, api: str, client) -> None:
        super().__init__(name="job-poller", daemon=True)
        self.api = api
        self.client = client
        self.job_id: str | None = None
        self.samples: list[tuple[float, int, int, str]] = []  # (t, rows ingested, succeeded, status)
        self.errors: list[str] = []
        self.terminal_at: float | None = None
        self.terminal_job: dict | None = None
        self.polls = {"job": 0, "list": 0}  # status polls sent, by kind (their Redis cost is measured apart)
        self.done = threading.Event()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        session = requests.Session()
        while not self._halt.is_set():
            started = time.perf_counter()
            job = None
            try:
                self.polls["job" if self.job_id else "list"] += 1
                if self.job_id:
                    r = session.get(f"{self.api}/v1/jobs/{self.job_id}", timeout=30)
                    job = r.json() if r.status_code == 200 else None
                else:
                    r = session.get(f"{self.api}/v1/jobs", params={"limit": 1}, timeout=30)
                    data = r.json().get("data") if r.status_code == 200 else None
                    job = data[0] if data else None
                if r.status_code != 200:
                    self.errors.append(f"{r.request.method} {r.url} -> {r.status_code} {r.text[:300]}")
            except (requests.RequestException, ValueError) as e:
                self.errors.append(f"poll failed: {e!r}")
            seen = time.perf_counter()
            if job is not None:
                try:
                    rows_read = int(self.client.hget(keys.job(job["id"]), "rows_read") or 0)
                except Exception:  # noqa: BLE001 - a diagnostic only
                    rows_read = -1
                self.samples.append((seen, rows_read, int(job["counts"]["succeeded"]), job["status"]))
                if self.job_id and job["id"] == self.job_id and job["status"] in TERMINAL:
                    self.terminal_at, self.terminal_job = seen, job
                    self.done.set()
                    return
            interval = POLL_SECONDS if self.job_id else LIST_POLL_SECONDS
            self._halt.wait(max(0.0, interval - (time.perf_counter() - started)))


def _proc_status(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1]) * 1024
    return out


def _pgrp(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[2]) if fields[0] not in ("Z", "X") else None


def cpu_seconds(groups: dict[str, int]) -> dict[int, tuple[str, bool, float]]:
    """pid -> (group, is the group leader, user+system CPU seconds so far) for every process in the groups."""
    by_pgid = {pgid: name for name, pgid in groups.items()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read().decode("utf-8", "replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = data[data.rindex(")") + 2:].split()
        group = by_pgid.get(int(fields[2]))
        if group is not None:
            out[int(name)] = (group, int(name) == int(fields[2]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler(threading.Thread):
    """Every 0.2 s: VmRSS and VmHWM of every process in the given process groups, max kept per process."""

    def __init__(self, groups: dict[str, int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.groups = {pgid: name for name, pgid in groups.items()}
        self.phase = "job"
        self.peaks: dict[int, dict[str, Any]] = {}
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()  # a last reading

    def set_phase(self, phase: str) -> None:
        """Close the current phase with a reading, and open the next with another (short phases get one too)."""
        self.sample()
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            group = self.groups.get(_pgrp(pid))  # type: ignore[arg-type]
            if group is None:
                continue
            status = _proc_status(pid)
            if not status:
                continue
            entry = self.peaks.setdefault(pid, {"group": group, "leader": pid in self.groups,
                                                "job": 0, "parquet": 0, "jsonl": 0, "hwm": 0})
            entry[self.phase] = max(entry[self.phase], status.get("VmRSS", 0))
            entry["hwm"] = max(entry["hwm"], status.get("VmHWM", 0))

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.perf_counter()
            self.sample()
            self._halt.wait(max(0.0, SAMPLE_SECONDS - (time.perf_counter() - started)))


def download(session: requests.Session, url: str, dest: Path | None) -> tuple[float, int, int]:
    """(seconds, bytes, newlines) of one streamed GET, written to dest if given."""
    t0 = time.perf_counter()
    size = lines = 0
    with session.get(url, stream=True, timeout=(30, 3600)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"GET {url} -> {r.status_code}: {r.text[:500]}")
        with open(dest if dest else os.devnull, "wb") as fh:
            for block in r.iter_content(1 * MiB):
                size += len(block)
                lines += block.count(b"\n")
                fh.write(block)
    return time.perf_counter() - t0, size, lines


def redis_traffic(client, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Redis commands by name and bytes in and out so far (INFO commandstats and stats), or since `before`.

    The counts include this benchmark's own reads (its status polls go through the API, as a user's would).
    """
    calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in client.info("commandstats").items()}
    stats = client.info("stats")
    cpu = client.info("cpu")
    now = {"calls": calls, "in": stats["total_net_input_bytes"], "out": stats["total_net_output_bytes"],
           "cpu": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])}
    if before is None:
        return now
    return {"calls": {k: v - before["calls"].get(k, 0) for k, v in calls.items() if v - before["calls"].get(k, 0)},
            "in": now["in"] - before["in"], "out": now["out"] - before["out"], "cpu": now["cpu"] - before["cpu"]}


class CountingProxy(threading.Thread):
    """A TCP proxy on a free loopback port in front of the object store: counts the bytes each way."""

    def __init__(self, target_port: int) -> None:
        super().__init__(name="chunk-store-proxy", daemon=True)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.sent = 0      # to the store (requests: puts carry the blobs)
        self.received = 0  # from the store (responses: gets carry the blobs)
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"sent": self.sent, "received": self.received, "connections": self.connections}

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()
        self.listener.close()

    def _pump(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([conn, upstream], [], [], 1.0)
                for src in ready:
                    data = src.recv(1 << 16)
                    if not data:
                        return
                    (upstream if src is conn else conn).sendall(data)
                    with self._lock:
                        if src is conn:
                            self.sent += len(data)
                        else:
                            self.received += len(data)
        except OSError:
            return
        finally:
            conn.close()
            upstream.close()


_S3_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/[0-9.]+(?:\x1b\[0m)?" (\d+)')


def s3_requests(moto_log: str, offset: int) -> dict[str, int]:
    """Requests moto logged after `offset` bytes of its log, by method (and listings apart from gets)."""
    with open(moto_log, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        text = fh.read()
    counts: dict[str, int] = {}
    for method, path, _status in _S3_REQUEST.findall(text):
        kind = "LIST" if method == "GET" and ("list-type" in path or "prefix=" in path) else method
        kind = "DELETE (bulk)" if method == "POST" and "delete" in path else kind
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def chunk_store(args: argparse.Namespace, tmp: Path, logs: Path, started: list) -> tuple[dict[str, str], dict]:
    """The environment that points web and worker at `--chunk-store`, and what measures it (moto: a counting proxy)."""
    if not args.chunk_store:
        return {}, {}
    if args.chunk_store != "moto":
        return {"CHUNK_STORE_URL": args.chunk_store}, {"url": args.chunk_store}
    moto = MotoServer(log_dir=str(logs))
    started.append(moto)
    moto.start()
    proxy = CountingProxy(moto.port)
    proxy.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    import fsspec
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=moto.url, key="bench", secret="bench").mkdir(
        "predq-bench")
    log(f"moto S3 server on {moto.url} (pid {moto.pid}), counted through a proxy on port {proxy.port}")
    url = "s3://predq-bench/chunks"
    return {**env, "CHUNK_STORE_URL": url}, {"url": url, "moto": moto, "proxy": proxy, "endpoint": moto.url}


def store_objects(measure: dict) -> tuple[int, int]:
    """Objects and bytes in the chunk store now."""
    import fsspec
    if "moto" in measure:
        fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=measure["endpoint"], key="bench",
                               secret="bench")
        root = measure["url"].removeprefix("s3://")
    else:
        fs, root = fsspec.core.url_to_fs(measure["url"])
    if not fs.exists(root):
        return 0, 0
    sizes = fs.du(root, total=False)
    return len(sizes), sum(sizes.values())


def job_key_memory(client, job_id: str) -> int:
    """Redis memory of every key of a job (MEMORY USAGE, bytes)."""
    return sum(client.memory_usage(k, samples=0) or 0 for k in client.keys(f"{keys.job(job_id)}*"))


class CommandMonitor(threading.Thread):
    """Redis MONITOR on its own connection: counts commands by name, sent by clients or run inside Lua scripts.

    MONITOR costs the server CPU and output bytes of its own, so a run with it is for these counts only.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(name="redis-monitor", daemon=True)
        self.client = redis.Redis(host=host, port=port, socket_timeout=1)
        self.counts: dict[tuple[str, str], int] = {}  # (client kind, command) -> count, in the window
        self.window: tuple[float, float] = (0.0, float("inf"))
        self._halt = threading.Event()
        self.ready = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        conn = self.client.connection_pool.get_connection("MONITOR")
        conn.send_command("MONITOR")
        conn.read_response()
        self.ready.set()
        try:
            while not self._halt.is_set():
                try:
                    line = conn.read_response(disable_decoding=True)
                except redis.TimeoutError:
                    continue
                ts, _, rest = line.partition(b" ")
                if not self.window[0] <= float(ts) <= self.window[1]:
                    continue
                info_end = rest.find(b"]")
                kind = "lua" if rest[:info_end].endswith(b"lua") else "client"
                name_start = rest.find(b'"', info_end) + 1
                name = rest[name_start:rest.find(b'"', name_start)].decode(errors="replace").lower()
                self.counts[(kind, name)] = self.counts.get((kind, name), 0) + 1
        finally:
            conn.disconnect()


def poll_cost(api: str, client, job_id: str, n: int = 50) -> dict[str, dict[str, float]]:
    """Redis commands, bytes and CPU of one status poll of each kind the poller sends, measured over n polls."""
    session = requests.Session()
    cost = {}
    for kind, url in (("job", f"{api}/v1/jobs/{job_id}"), ("list", f"{api}/v1/jobs?limit=1")):
        before = redis_traffic(client)
        for _ in range(n):
            session.get(url, timeout=30).raise_for_status()
            client.hget(keys.job(job_id), "rows_read")
        delta = redis_traffic(client, before)
        cost[kind] = {"calls": sum(delta["calls"].values()) / n, "in": delta["in"] / n, "out": delta["out"] / n,
                      "cpu": delta["cpu"] / n}
    return cost


def run_service(args: argparse.Namespace, tmp: Path, models_dir: Path, data: Path, rows: int) -> dict[str, Any]:
    logs = tmp / "logs"
    started: list = []
    out: dict[str, Any] = {"logs": logs}
    measure: dict[str, Any] = {}
    try:
        server = RedisServer(dir=str(tmp / "redis"))
        started.append(server)
        server.start()
        client = server.client(socket_timeout=60)
        log(f"redis-compatible server on port {server.port} (pid {server.pid})")
        store_env, measure = chunk_store(args, tmp, logs, started)
        out["chunk_store"] = measure.get("url")
        web = ProcfileWeb(server.url, models_dir=str(models_dir), env=store_env, log_dir=str(logs))
        started.append(web)
        web.start()
        log(f"web: {web.url} (gunicorn master pid {web.pid}, workers {web.worker_pids()})")
        worker = ProcfileWorker(server.url, models_dir=str(models_dir), env=store_env, log_dir=str(logs))
        worker.pool_processes = args.workers
        started.append(worker)
        worker.start()
        log(f"worker: celery main pid {worker.pid}, pool children {worker.child_pids()}")
        out["web_log"], out["worker_log"] = web.log_path, worker.log_path
        out["server_version"] = client.info("server").get("valkey_version") or client.info("server")["redis_version"]

        groups = {"web": web.pid, "worker": worker.pid, "redis": server.pid}
        sampler = RssSampler(groups)
        sampler.start()
        poller = JobPoller(web.url, client)
        fields = {"model": args.model}
        if args.chunk_size:
            fields["chunk_size"] = str(args.chunk_size)
        body = MultipartBody(data, fields)
        session = requests.Session()
        log(f"uploading {body.length / MiB:.1f} MiB ({rows} rows) to POST /v1/jobs")
        cpu_before, self_before = cpu_seconds(groups), _self_cpu()
        monitor = None
        if args.monitor:
            monitor = CommandMonitor("127.0.0.1", server.port)
            monitor.start()
            monitor.ready.wait(10)
            monitor.window = (time.time(), float("inf"))
        redis_before = redis_traffic(client)
        if "proxy" in measure:
            store_before = measure["proxy"].counts()
            moto_offset = os.path.getsize(measure["moto"].log_path)
        poller.start()
        r = session.post(f"{web.url}/v1/jobs", data=body, headers={"Content-Type": body.content_type},
                         timeout=(30, 3600))
        accepted_at = time.perf_counter()
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs -> {r.status_code}: {r.text[:1000]}")
        job = r.json()
        poller.job_id = job["id"]
        first = body.first_byte_at
        assert first is not None
        log(f"202 after {accepted_at - first:.1f} s: {job['id']} total={job['counts']['total']} "
            f"succeeded so far={job['counts']['succeeded']}")
        while not poller.done.wait(5):
            if not poller.is_alive():
                raise RuntimeError(f"the poller stopped: {poller.errors[-3:]}")
            if not worker.running or not web.running:
                raise RuntimeError("a service process exited during the job")
            s = poller.samples[-1] if poller.samples else None
            if s:
                log(f"  t={s[0] - first:6.1f}s status={s[3]} succeeded={s[2]}")
        terminal_at = poller.terminal_at
        cpu_after, self_after = cpu_seconds(groups), _self_cpu()
        cpu = {pid: (g, leader, t - cpu_before.get(pid, (g, leader, 0.0))[2]) for pid, (g, leader, t) in cpu_after.items()}
        final = poller.terminal_job
        assert terminal_at is not None and final is not None
        log(f"terminal after {terminal_at - first:.1f} s: {final['status']} counts={final['counts']}")
        redis_job = redis_traffic(client, redis_before)
        if monitor is not None:
            monitor.window = (monitor.window[0], time.time())
            time.sleep(2)  # let the monitor read what the server sent before the window closed
            monitor.stop()
            out["monitor"] = dict(monitor.counts)
        if "proxy" in measure:
            after = measure["proxy"].counts()
            out["store_traffic"] = {"sent": after["sent"] - store_before["sent"],
                                    "received": after["received"] - store_before["received"],
                                    "requests": s3_requests(measure["moto"].log_path, moto_offset)}
        if measure:
            out["store_objects"] = store_objects(measure)
        out["job_key_memory"] = job_key_memory(client, job["id"])
        out["polls"], out["poll_cost"] = dict(poller.polls), poll_cost(web.url, client, job["id"])
        redis_after_job = client.info("memory")
        results_key = keys.results(job["id"])
        fields_ = client.hkeys(results_key)
        with client.pipeline(transaction=False) as p:
            for f in fields_:
                p.hstrlen(results_key, f)
            results_bytes = sum(p.execute())

        sampler.set_phase("parquet")
        pq_path = tmp / "predq-results.parquet"
        runs = [download(session, f"{web.url}/v1/jobs/{job['id']}/results?format=parquet", pq_path)
                for _ in range(DOWNLOADS)]
        pq_seconds, pq_bytes = statistics.median(r[0] for r in runs), runs[-1][1]
        pq_rows = pq.read_metadata(pq_path).num_rows
        log(f"parquet download: median {pq_seconds:.2f} s of {DOWNLOADS}, {pq_bytes / MiB:.1f} MiB, {pq_rows} rows")
        sampler.set_phase("jsonl")
        runs = [download(session, f"{web.url}/v1/jobs/{job['id']}/results?format=jsonl", None) for _ in range(DOWNLOADS)]
        js_seconds, js_bytes, js_rows = statistics.median(r[0] for r in runs), runs[-1][1], runs[-1][2]
        log(f"jsonl download: median {js_seconds:.2f} s of {DOWNLOADS}, {js_bytes / MiB:.1f} MiB, {js_rows} rows")
        sampler.stop()
        poller.stop()

        out.update({
            "job": final, "first": first, "accepted": accepted_at, "terminal": terminal_at,
            "last_byte": body.last_byte_at, "upload_bytes": body.length, "samples": poller.samples,
            "poll_errors": poller.errors, "job_at_202": job,
            "pq": (pq_seconds, pq_bytes, pq_rows), "jsonl": (js_seconds, js_bytes, js_rows),
            "redis": redis_after_job, "redis_job": redis_job, "redis_end": client.info("memory"), "results_bytes": results_bytes,
            "results_chunks": len(fields_), "peaks": sampler.peaks,
            "cpu": cpu, "client_cpu": self_after - self_before,
            "worker_concurrency": len(worker.child_pids()), "web_workers": len(web.worker_pids()),
        })
        return out
    except Exception:
        for proc in started:
            if isinstance(proc, (ProcfileWeb, ProcfileWorker)):
                log(f"last lines of the {proc.kind} log ({proc.log_path}):\n{proc.log_tail(30)}")
        raise
    finally:
        if "proxy" in measure:
            measure["proxy"].stop()
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception as e:  # noqa: BLE001 - stop the rest anyway
                log(f"stopping {proc!r} failed: {e!r}")
                try:
                    proc.kill()
                except Exception as e2:  # noqa: BLE001
                    log(f"killing {proc!r} failed: {e2!r}")


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

def _read_json_lines(path: str) -> list[dict]:
    import orjson

    entries = []
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.startswith(b"{"):
                    try:
                        entries.append(orjson.loads(line))
                    except orjson.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return entries


def _problem_lines(path: str, limit: int = 8) -> tuple[int, list[str]]:
    """Warning/error lines of a log (JSON entries and plain gunicorn/celery lines)."""
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                low = line.lower()
                if ('"level":"error"' in low or '"level":"warning"' in low or '"level":"critical"' in low
                        or "[error]" in low or "[critical]" in low or "traceback" in low or "warning:" in low):
                    found.append(line.rstrip()[:400])
    except FileNotFoundError:
        pass
    return len(found), found[:limit]


def report(args: argparse.Namespace, rows: int, data: Path, inproc: dict[str, Any], svc: dict[str, Any],
           load_before: tuple[float, float, float]) -> None:
    import celery
    import gunicorn

    first = svc["first"]
    e2e = svc["terminal"] - first
    base = inproc["total"]

    def line(what: str, seconds: float, n: int | None = rows) -> str:
        rate = f"{n / seconds:,.0f}" if n and seconds > 0 else ""
        return f"| {what} | {seconds:.2f} | {rate} | {seconds / base:.2f}x |"

    print()
    print(f"## predq batch benchmark: {args.model}, {rows:,} rows, {data.suffix[1:]} "
          f"{data.stat().st_size / MiB:.1f} MiB")
    print()
    print(f"python {platform.python_version()}, scikit-learn {sklearn.__version__}, pyarrow {pa.__version__}, "
          f"pandas {pd.__version__}, numpy {np.__version__}, celery {celery.__version__}, "
          f"gunicorn {gunicorn.__version__}, server {svc.get('server_version')}")
    nproc = subprocess.run(["nproc"], check=False, capture_output=True, text=True).stdout.strip()

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], check=False, capture_output=True, text=True, cwd=REPO_ROOT).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
    print(f"predq at commit {git('rev-parse', '--short', 'HEAD').strip() or '?'}"
          + (f", with uncommitted changes to {', '.join(d[3:] for d in dirty)}" if dirty else ""))
    print(f"nproc {nproc}; load average before the run {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}; web: {svc['web_workers']} gunicorn workers (gthread), worker: 1 celery "
          f"worker with {svc['worker_concurrency']} pool processes; chunk_size "
          f"{args.chunk_size or 'chosen by the server'}")
    print()
    print("| what | seconds | rows/s | ratio to in-process |")
    print("|---|---:|---:|---:|")
    print(line("in-process: read_parquet" if data.suffix == ".parquet" else "in-process: read_csv (pyarrow engine)",
               inproc["read_csv"]))
    print(line("in-process: predict", inproc["predict"]))
    print(line("in-process: write Parquet", inproc["write_parquet"]))
    print(line("**in-process total**", inproc["total"]))
    print(line("predq: upload + ingest (first byte -> 202)", svc["accepted"] - first))
    print(line("**predq end to end (first byte -> terminal status)**", e2e))
    print(line(f"predq: download results as Parquet (median of {DOWNLOADS})", svc["pq"][0]))
    print(line(f"predq: download results as JSON Lines (median of {DOWNLOADS})", svc["jsonl"][0]))
    print(line("predq: end to end + Parquet download", e2e + svc["pq"][0]))
    print()
    print("ratio = seconds / in-process total seconds (higher is slower).")
    print()
    print("| goal | in-process limit, s | predq, s | predq throughput / limit |")
    print("|---|---:|---:|---:|")
    for what, limit, ours in ((f"{data.suffix[1:]} job, first byte -> terminal status", inproc["total"], e2e),
                              ("results as Parquet: read_parquet + to_parquet", inproc["results_parquet"], svc["pq"][0]),
                              ("results as JSON Lines: read_parquet + to_json(lines)", inproc["results_jsonl"],
                               svc["jsonl"][0])):
        print(f"| {what} | {limit:.2f} | {ours:.2f} | **{limit / ours:.2f}x** |")

    peaks = svc["peaks"].values()

    def mib(v: float) -> str:
        return f"{v / MiB:,.0f}"

    def group_peak(group: str, leader: bool | None, key: str) -> tuple[float, int]:
        sel = [p for p in peaks if p["group"] == group and (leader is None or p["leader"] == leader)]
        if not sel:
            return 0.0, 0
        if key == "all":
            return max(max(p["job"], p["parquet"], p["jsonl"], p["hwm"]) for p in sel), len(sel)
        return max(p[key] for p in sel), len(sel)

    rj = svc["redis"]
    print()
    print("Peak RSS per process: VmRSS sampled every 0.2 s during the job (first byte -> terminal) and during each "
          "download, VmHWM read at the end; the max over the processes of each kind.")
    print()
    print("| memory | MiB |")
    print("|---|---:|")
    print(f"| in-process peak RSS (one process, ru_maxrss) | {mib(inproc['peak_rss'])} |")
    for group, label, kinds in (("web", "web (gunicorn)", ((True, "gunicorn master"), (False, "gunicorn workers"))),
                                ("worker", "worker (celery)", ((True, "celery main"), (False, "celery pool children")))):
        v, n = group_peak(group, None, "all")
        print(f"| **{label}: max over its {n} processes, max(VmRSS, VmHWM)** | **{mib(v)}** |")
        for leader, who in kinds:
            vj, n = group_peak(group, leader, "job")
            vp, _ = group_peak(group, leader, "parquet")
            vl, _ = group_peak(group, leader, "jsonl")
            vh, _ = group_peak(group, leader, "hwm")
            print(f"| &nbsp; {who} ({n}): VmRSS during the job / Parquet download / JSONL download; VmHWM | "
                  f"{mib(vj)} / {mib(vp)} / {mib(vl)}; {mib(vh)} |")
    v, _ = group_peak("redis", None, "all")
    print(f"| redis-compatible server process peak RSS | {mib(v)} |")
    print(f"| Redis used_memory_peak (after the job) | {mib(rj['used_memory_peak'])} |")
    print(f"| Redis used_memory (after the job) | {mib(rj['used_memory'])} |")
    print(f"| stored results: sum of HSTRLEN over {svc['results_chunks']} result blobs | "
          f"{svc['results_bytes'] / MiB:,.1f} |")
    print(f"| results downloaded: Parquet / JSON Lines | {svc['pq'][1] / MiB:,.1f} / {svc['jsonl'][1] / MiB:,.1f} |")
    print(f"| in-process Parquet file | {inproc['parquet_bytes'] / MiB:,.1f} |")
    traffic = svc["redis_job"]
    chunks = svc["results_chunks"] or 1
    total_calls = sum(traffic["calls"].values())
    print()
    print(f"Redis traffic during the job (first byte -> terminal status; INFO commandstats and stats, including "
          f"the status polls every {POLL_SECONDS} s), {chunks} chunks:")
    print()
    print("| what | total | per chunk | per 1M rows |")
    print("|---|---:|---:|---:|")
    per_m = 1_000_000 / rows
    print(f"| Redis commands (all) | {total_calls:,} | {total_calls / chunks:,.1f} | {total_calls * per_m:,.0f} |")
    for name, n in sorted(traffic["calls"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"| &nbsp; {name} | {n:,} | {n / chunks:,.1f} | {n * per_m:,.0f} |")
    print(f"| bytes into Redis (MiB) | {traffic['in'] / MiB:,.1f} | {traffic['in'] / chunks / MiB:,.2f} | "
          f"{traffic['in'] * per_m / MiB:,.1f} |")
    print(f"| bytes out of Redis (MiB) | {traffic['out'] / MiB:,.1f} | {traffic['out'] / chunks / MiB:,.2f} | "
          f"{traffic['out'] * per_m / MiB:,.1f} |")
    print(f"| bytes into / out of Redis (KiB) | {traffic['in'] / 1024:,.0f} / {traffic['out'] / 1024:,.0f} | "
          f"{traffic['in'] / chunks / 1024:,.1f} / {traffic['out'] / chunks / 1024:,.1f} | "
          f"{traffic['in'] * per_m / 1024:,.0f} / {traffic['out'] * per_m / 1024:,.0f} |")
    print(f"| stored results (MiB) | {svc['results_bytes'] / MiB:,.1f} | {svc['results_bytes'] / chunks / MiB:,.2f} | "
          f"{svc['results_bytes'] * per_m / MiB:,.1f} |")
    polls, pc = svc["polls"], svc["poll_cost"]
    spent_polling = {k: sum(polls[kind] * pc[kind][k] for kind in polls) for k in ("calls", "in", "out", "cpu")}
    net = {"calls": total_calls - spent_polling["calls"], "in": traffic["in"] - spent_polling["in"],
           "out": traffic["out"] - spent_polling["out"], "cpu": traffic.get("cpu", 0.0) - spent_polling["cpu"]}
    print(f"| status polls ({polls['job']} of the job, {polls['list']} listings before the 202): commands, measured "
          f"apart ({pc['job']['calls']:.1f} and {pc['list']['calls']:.1f} a poll) | {spent_polling['calls']:,.0f} | "
          f"{spent_polling['calls'] / chunks:,.1f} | {spent_polling['calls'] * per_m:,.0f} |")
    print(f"| **Redis commands without the polls** | **{net['calls']:,.0f}** | **{net['calls'] / chunks:,.1f}** | "
          f"**{net['calls'] * per_m:,.0f}** |")
    print(f"| Redis bytes in / out without the polls (KiB) | {net['in'] / 1024:,.0f} / {net['out'] / 1024:,.0f} | "
          f"{net['in'] / chunks / 1024:,.1f} / {net['out'] / chunks / 1024:,.1f} | "
          f"{net['in'] * per_m / 1024:,.0f} / {net['out'] * per_m / 1024:,.0f} |")
    print(f"| Redis CPU without the polls (ms) | {net['cpu'] * 1000:,.0f} | {net['cpu'] * 1000 / chunks:,.2f} | "
          f"{net['cpu'] * 1000 * per_m:,.0f} |")
    print(f"| Redis memory of the job's keys after it (MEMORY USAGE, KiB) | {svc['job_key_memory'] / 1024:,.1f} | "
          f"{svc['job_key_memory'] / chunks / 1024:,.2f} | {svc['job_key_memory'] * per_m / 1024:,.1f} |")
    redis_cpu = traffic.get("cpu", 0.0)
    print(f"| Redis server CPU (INFO cpu, user + sys, ms) | {redis_cpu * 1000:,.0f} | {redis_cpu * 1000 / chunks:,.1f} | "
          f"{redis_cpu * 1000 * per_m:,.0f} |")
    if svc.get("monitor"):
        mon = svc["monitor"]
        sent = sum(n for (kind, _), n in mon.items() if kind == "client")
        in_lua = sum(n for (kind, _), n in mon.items() if kind == "lua")
        print()
        print("Redis MONITOR during the job (status polls included): commands sent by clients (network round trips "
              "or pipeline entries) and commands run inside Lua scripts:")
        print()
        print("| what | total | per chunk | per 1M rows |")
        print("|---|---:|---:|---:|")
        for label, n in (("sent by clients", sent), ("run inside Lua scripts", in_lua)):
            print(f"| {label} | {n:,} | {n / chunks:,.1f} | {n * per_m:,.0f} |")
        for (kind, name), n in sorted(mon.items(), key=lambda kv: -kv[1])[:10]:
            print(f"| &nbsp; {name} ({'in Lua' if kind == 'lua' else 'sent'}) | {n:,} | {n / chunks:,.1f} | "
                  f"{n * per_m:,.0f} |")
    if svc.get("chunk_store"):
        print()
        print(f"Chunk store {svc['chunk_store']} after the job: {svc['store_objects'][0]:,} objects, "
              f"{svc['store_objects'][1] / MiB:,.1f} MiB (results and row errors; inputs are removed as chunks commit).")
    if svc.get("store_traffic"):
        st = svc["store_traffic"]
        n_req = sum(st["requests"].values())
        print()
        print("Object store traffic during the job (bytes on the wire through a counting proxy, HTTP headers included; "
              "requests from moto's log):")
        print()
        print("| what | total | per chunk | per 1M rows |")
        print("|---|---:|---:|---:|")
        print(f"| S3 requests (all) | {n_req:,} | {n_req / chunks:,.1f} | {n_req * per_m:,.0f} |")
        for name, n in sorted(st["requests"].items(), key=lambda kv: -kv[1]):
            print(f"| &nbsp; {name} | {n:,} | {n / chunks:,.1f} | {n * per_m:,.0f} |")
        print(f"| bytes to the store (MiB) | {st['sent'] / MiB:,.1f} | {st['sent'] / chunks / MiB:,.2f} | "
              f"{st['sent'] * per_m / MiB:,.1f} |")
        print(f"| bytes from the store (MiB) | {st['received'] / MiB:,.1f} | {st['received'] / chunks / MiB:,.2f} | "
              f"{st['received'] * per_m / MiB:,.1f} |")
    print()
    print("| process | pid | VmRSS peak: job | Parquet download | JSONL download | VmHWM |")
    print("|---|---:|---:|---:|---:|---:|")
    labels = {("web", True): "gunicorn master", ("web", False): "gunicorn worker", ("worker", True): "celery main",
              ("worker", False): "celery pool child", ("redis", True): "redis-compatible server"}
    for pid, p in sorted(svc["peaks"].items(), key=lambda kv: (kv[1]["group"], not kv[1]["leader"], kv[0])):
        print(f"| {labels.get((p['group'], p['leader']), p['group'])} | {pid} | {mib(p['job'])} | {mib(p['parquet'])} "
              f"| {mib(p['jsonl'])} | {mib(p['hwm'])} |")

    # Where the time goes.
    samples = svc["samples"]
    accepted = svc["accepted"] - first
    print()
    print("### Timeline (seconds after the first byte sent)")
    print()
    print("| t | rows ingested by the API | rows succeeded (workers) | status |")
    print("|---:|---:|---:|---:|")
    ok_at_202 = svc["job_at_202"]["counts"]["succeeded"]
    timeline = [(t - first, ingested, ok, status) for t, ingested, ok, status in samples]
    timeline.append((accepted, rows, ok_at_202, f"**202** ({svc['job_at_202']['status']})"))
    timeline.sort(key=lambda s: s[0])
    step = max(e2e / 25, LIST_POLL_SECONDS)
    next_t = 0.0
    for i, (rel, ingested, ok, status) in enumerate(timeline):
        if rel >= next_t or i == len(timeline) - 1 or status.startswith("**"):
            print(f"| {rel:.1f} | {ingested:,} | {ok:,} | {status} |")
            next_t = rel + step
    first_commit = next((s[0] for s in timeline if s[2] > 0), None)
    first_ingest = next((s[0] for s in timeline if s[1] > 0), None)
    print()
    print(f"- upload body fully handed to the socket at {svc['last_byte'] - first:.1f} s; 202 at {accepted:.1f} s; "
          f"terminal at {e2e:.1f} s (polled every {POLL_SECONDS} s)")
    print(f"- API ingest: {rows / accepted:,.0f} rows/s, {svc['upload_bytes'] / MiB / accepted:.1f} MiB/s "
          f"(first chunk stored at ~{first_ingest if first_ingest is not None else float('nan'):.1f} s)")
    if first_commit is not None:
        print(f"- first chunk committed at ~{first_commit:.1f} s; {ok_at_202:,} rows ({ok_at_202 / rows:.0%}) "
              f"had succeeded when the 202 came back")
    after = e2e - accepted
    if after > 0:
        print(f"- after the 202: {rows - ok_at_202:,} rows left, done {after:.1f} s later (workers alone; the poll "
              f"resolution is {POLL_SECONDS} s)")
    backlog = max((s[1] - s[2] for s in samples), default=0)
    print(f"- largest backlog (ingested, not yet committed): {backlog:,} rows")
    commits = [e for e in _read_json_lines(svc["worker_log"]) if e.get("message") == "chunk committed"]
    if commits:
        secs = [float(e.get("seconds", 0)) for e in commits]
        busy = sum(secs)
        conc = max(svc["worker_concurrency"], 1)
        print(f"- worker: {len(commits)} chunks, {min(secs):.2f}-{max(secs):.2f} s each (mean {busy / len(commits):.2f} s), "
              f"{rows / busy:,.0f} rows/s per pool process while busy, {busy:.1f} s busy in total = "
              f"{busy / (conc * e2e):.0%} of {conc} processes x end-to-end time; "
              f"outcomes {sorted({e.get('outcome') for e in commits})}")
    roles = {("web", True): "gunicorn master", ("web", False): "gunicorn workers", ("worker", True): "celery main",
             ("worker", False): "celery pool children", ("redis", True): "redis-compatible server"}
    spent: dict[str, float] = {}
    for group, leader, seconds in svc["cpu"].values():
        role = roles.get((group, leader), group)
        spent[role] = spent.get(role, 0.0) + seconds
    spent["this benchmark (client upload, polling, sampling)"] = svc["client_cpu"]
    ncpu = len(os.sched_getaffinity(0))
    print(f"- CPU seconds during the job (first byte -> terminal, {e2e:.1f} s wall, {ncpu} cores = "
          f"{ncpu * e2e:.1f} core-seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in spent.items())
          + f"; total {sum(spent.values()):.1f}")
    final = svc["job"]
    print(f"- job: status {final['status']}, counts {final['counts']}, server rows_per_second "
          f"{final.get('rows_per_second')}")
    pq_rows, js_rows = svc["pq"][2], svc["jsonl"][2]
    print(f"- row counts: Parquet {pq_rows:,}, JSON Lines {js_rows:,}, expected {rows:,}: "
          f"{'OK' if pq_rows == js_rows == rows else 'MISMATCH'}")
    for name, path in (("web", svc["web_log"]), ("worker", svc["worker_log"])):
        n, lines = _problem_lines(path)
        if n:
            print(f"- {name} log: {n} warning/error lines, first ones:")
            for text in lines:
                print(f"    {text}")
    if svc["poll_errors"]:
        print(f"- poll errors: {len(svc['poll_errors'])}, e.g. {svc['poll_errors'][:3]}")


# --------------------------------------------------------------------------------------------------

def prepare(tmp: Path, model: str, n_rows: int, seed: int, data: Path | None) -> tuple[Path, Path, int]:
    """Install the demo models under tmp and make (or reuse) the CSV: (models dir, CSV path, its rows)."""
    models_dir = tmp / "models"
    install_demo_models(models_dir)
    install_hgb20(models_dir)
    features = [f.name for f in Registry(models_dir).get(model).features]
    data = data.resolve() if data else tmp / f"{model}-{n_rows}.csv"
    if data.exists():
        rows = count_data_rows(data)
        log(f"reusing {data}: {rows} rows")
        return models_dir, data, rows
    t0 = time.perf_counter()
    data.parent.mkdir(parents=True, exist_ok=True)
    generate_csv(data, model, features, n_rows, seed)
    log(f"generated {data} ({data.stat().st_size / MiB:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return models_dir, data, n_rows


def as_parquet(csv_path: Path) -> Path:
    """The CSV's rows as Parquet beside it (made once), as a pandas user would write them: to_parquet defaults."""
    path = csv_path.with_suffix(".parquet")
    if not path.exists():
        tmp = path.with_name(path.name + ".part")
        pd.read_csv(csv_path, engine="pyarrow").to_parquet(tmp, index=False)
        tmp.replace(path)
        log(f"wrote {path} ({path.stat().st_size / MiB:.1f} MiB)")
    return path


def data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: which rows, which model, where, and whether to keep the files."""
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate (default 1,000,000)")
    parser.add_argument("--model", default=HGB20, choices=MODELS,
                        help="hgb20 (default: HistGradientBoosting, 20 features) or a demo model")
    parser.add_argument("--data", type=Path, help="CSV to use; generated there first if it does not exist")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated rows")


@contextmanager
def workdir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary working directory, removed at the end unless kept; SIGTERM stops the run like Ctrl-C."""
    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    log(f"working directory {tmp}")
    try:
        yield tmp
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data_arguments(parser)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the server chooses)")
    parser.add_argument("--workers", type=int, default=None,
                        help="pool processes of the one celery worker (WORKER_CONCURRENCY; default: the Procfile's)")
    parser.add_argument("--monitor", action="store_true",
                        help="count the job's Redis commands with MONITOR too (sent by clients / run in Lua); "
                             "MONITOR slows Redis, so use that run for counts only")
    parser.add_argument("--chunk-store", metavar="URL", default=None,
                        help="CHUNK_STORE_URL for web and worker (file:///dir, s3://...); 'moto': a private moto S3 "
                             "server, its traffic counted (default: chunk blobs in Redis)")
    parser.add_argument("--input", choices=("csv", "parquet"), default="csv",
                        help="upload the rows as CSV (default) or as Parquet (made from the CSV, kept beside it)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    try:
        with workdir("predq-bench-", args.keep) as tmp:
            models_dir, data, rows = prepare(tmp, args.model, args.rows, args.seed, args.data)
            if args.input == "parquet":
                data = as_parquet(data)

            log("in-process limit ...")
            inproc = run_in_process(models_dir, args.model, data, tmp / "inprocess.parquet")
            if inproc["rows"] != rows:
                raise RuntimeError(f"pandas read {inproc['rows']} rows, expected {rows}")
            log(f"in-process: read_csv {inproc['read_csv']:.2f} s, predict {inproc['predict']:.2f} s, "
                f"write {inproc['write_parquet']:.2f} s, total {inproc['total']:.2f} s")

            log("predq end to end ...")
            svc = run_service(args, tmp, models_dir, data, rows)
            report(args, rows, data, inproc, svc, load_before)
            return 0
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
