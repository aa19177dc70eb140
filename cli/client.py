"""A Python client for predq's HTTP API: what the `predq` command uses, importable by users.

    from cli.client import Client

    predq = Client("http://127.0.0.1:8000", api_key="pq_...")
    job = predq.submit("rows.csv", "breast_cancer", id_column="patient")
    job = predq.wait(job["id"], on_progress=lambda j: print(j["counts"]))
    predq.results(job["id"], "predictions.parquet")

Jobs, models and predictions are the contract's JSON objects, as dicts. Every error answer raises `ApiError`
(`ServerUnreachable` when no answer came at all).
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "partially_succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *TERMINAL)
RESULT_FORMATS = ("jsonl", "csv", "parquet")
ERROR_FORMATS = ("jsonl", "csv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_BLOCK = 1 << 20


class ApiError(Exception):
    """An error answer from the service: HTTP status, the contract's error code and message, and any details."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(f"{message} ({status} {code})")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class ServerUnreachable(ApiError):
    """No answer at all: the connection was refused, timed out or broke."""

    def __init__(self, message: str):
        super().__init__(0, "unreachable", message)


def format_for(path: str | os.PathLike, allowed: tuple[str, ...] = RESULT_FORMATS) -> str:
    """The download format a file name asks for by its extension (.jsonl/.ndjson, .csv, .parquet/.pq)."""
    suffix = Path(path).suffix.lower()
    fmt = _EXTENSIONS.get(suffix)
    if fmt not in allowed:
        names = ", ".join(sorted(e for e, f in _EXTENSIONS.items() if f in allowed))
        raise ValueError(f"cannot tell the format from {str(path)!r}: name the file with {names}, or give the format")
    return fmt


class _MultipartBody:
    """A multipart/form-data body read in blocks from an open file, so no upload is held in memory whole.

    Its length is known up front (the file's size plus the part headers), so it is sent with Content-Length;
    it has no `__iter__` or `tell`, which would make requests send it chunked.
    """

    def __init__(self, fields: dict[str, str], filename: str, file: IO[bytes], size: int,
                 on_progress: Callable[[int, int], None] | None):
        boundary = f"predq-{uuid.uuid4().hex}"
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                        for name, value in fields.items())
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode()
        self._head, self._tail = head, f"\r\n--{boundary}--\r\n".encode()
        self._parts: list[bytes | IO[bytes]] = [self._head, file, self._tail]
        self._length = len(head) + size + len(self._tail)
        self._sent = 0
        self._on_progress = on_progress

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        size = _BLOCK if size is None or size < 0 else size
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                piece, rest = part[:size], part[size:]
                if rest:
                    self._parts[0] = rest
                else:
                    self._parts.pop(0)
            else:
                piece = part.read(size)
                if not piece:
                    self._parts.pop(0)
                    continue
            self._sent += len(piece)
            if self._on_progress is not None:
                self._on_progress(self._sent, self._length)
            return piece
        return b""


class Client:
    """predq at `url` (default $PREDQ_URL or http://127.0.0.1:8000), with `api_key` (default $PREDQ_API_KEY)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60):
        self.url = (url or os.environ.get("PREDQ_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PREDQ_API_KEY") or None
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "predq-client"
        if self.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.api_key}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    # -- transport ---------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, params: dict | None = None, stream: bool = False,
              timeout: float | tuple[float, float] | None = None, **kwargs: Any) -> requests.Response:
        """The answer to one request; an error status raises ApiError with the service's message."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.session.request(method, f"{self.url}{path}", params=params, stream=stream,
                                            timeout=timeout or (min(10.0, self.timeout), self.timeout), **kwargs)
        except requests.Timeout as e:
            raise ServerUnreachable(f"predq at {self.url} did not answer in time ({e.__class__.__name__})") from None
        except requests.ConnectionError as e:
            raise ServerUnreachable(f"predq at {self.url} does not answer: {_reason(e)}") from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    def request(self, method: str, path: str, params: dict | None = None, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON body) of a JSON request to any route."""
        response = self._send(method, path, params=params, json=body)
        return response.status_code, response.json() if response.content else None

    # -- models and predictions --------------------------------------------------------------------

    def models(self) -> list[dict]:
        """Every deployed model, each described by its newest version."""
        return self.request("GET", "/v1/models")[1]["data"]

    def model(self, name: str, version: str | None = None) -> dict:
        return self.request("GET", f"/v1/models/{quote(name, safe='')}", {"version": version})[1]

    def predict(self, model: str, rows: dict | list[dict], *, version: str | None = None,
                probabilities: bool = False) -> dict:
        """The service's answer for one row (a dict) or up to SYNC_MAX_ROWS rows (a list of dicts)."""
        params = {"version": version, "probabilities": "true" if probabilities else None}
        return self.request("POST", f"/v1/models/{quote(model, safe='')}/predict", params, rows)[1]

    # -- jobs --------------------------------------------------------------------------------------

    def submit(self, source: str | os.PathLike | IO[bytes], model: str, *, version: str | None = None,
               id_column: str | None = None, probabilities: bool = False, options: dict | None = None,
               filename: str | None = None, on_upload: Callable[[int, int], None] | None = None) -> dict:
        """Upload a CSV, JSON Lines or Parquet file (a path or a binary file object) as a new job; the Job.

        The file is read in blocks while it is sent, never whole. The format comes from the file's name
        (or `filename` for a file object without one). `options` holds further job options
        (`chunk_size`, `max_error_rate`, `metadata`); `on_upload(bytes_sent, bytes_total)` follows the upload.
        """
        fields = {"model": model, "version": version, "id_column": id_column,
                  "probabilities": "true" if probabilities else None}
        for name, value in (options or {}).items():
            fields[name] = json.dumps(value) if isinstance(value, dict) else value
        fields = {k: str(v) for k, v in fields.items() if v is not None}
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as file:
                return self._upload(fields, filename or Path(source).name, file, on_upload)
        name = filename or Path(getattr(source, "name", "") or "").name
        if not name:
            raise ValueError("a file object without a name needs filename= (its extension tells the format)")
        return self._upload(fields, name, source, on_upload)

    def _upload(self, fields: dict[str, str], filename: str, file: IO[bytes],
                on_upload: Callable[[int, int], None] | None) -> dict:
        try:
            start = file.tell()
            size = file.seek(0, io.SEEK_END) - start
            file.seek(start)
        except (OSError, AttributeError, ValueError):
            raise ValueError("the file object must be seekable, so the upload's length is known") from None
        body = _MultipartBody(fields, filename, file, size, on_upload)
        # The service answers once the whole file is read and its chunks are queued: allow it time.
        response = self._send("POST", "/v1/jobs", data=body, headers={"Content-Type": body.content_type},
                              timeout=(10, max(self.timeout, 600)))
        return response.json()

    def submit_rows(self, model: str, rows: list[dict], *, version: str | None = None,
                    id_column: str | None = None, probabilities: bool = False, options: dict | None = None) -> dict:
        """A job from rows held in memory (a JSON body); the Job."""
        body = {"model": model, "version": version, "rows": rows, "id_column": id_column,
                "probabilities": probabilities or None, **(options or {})}
        return self.request("POST", "/v1/jobs", body={k: v for k, v in body.items() if v is not None})[1]

    def status(self, job_id: str) -> dict:
        """The job now: status, counts, progress, rows_per_second, eta_seconds."""
        return self.request("GET", f"/v1/jobs/{quote(job_id, safe='')}")[1]

    job = status

    def jobs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> list[dict]:
        """One page of jobs, newest first; `iter_jobs` follows the pages."""
        return self._jobs_page(status, limit, cursor)["data"]

    def _jobs_page(self, status: str | None, limit: int, cursor: str | None) -> dict:
        return self.request("GET", "/v1/jobs", {"status": status, "limit": limit, "cursor": cursor})[1]

    def iter_jobs(self, status: str | None = None, page_size: int = 100) -> Iterator[dict]:
        """Every job the API key may see, newest first."""
        cursor = None
        while True:
            page = self._jobs_page(status, page_size, cursor)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def wait(self, job_id: str, on_progress: Callable[[dict], None] | None = None, *, interval: float = 1.0,
             timeout: float | None = None, outage: float = 60.0) -> dict:
        """Poll the job until it is terminal and return it; `on_progress(job)` sees every poll.

        A service that stops answering (or is rate limiting) for less than `outage` seconds is waited for;
        past `timeout` seconds TimeoutError is raised (the job goes on).
        """
        started = time.monotonic()
        delay = min(0.2, interval)
        unanswered_since: float | None = None
        while True:
            try:
                job = self.status(job_id)
                unanswered_since = None
            except ApiError as e:
                if not isinstance(e, ServerUnreachable) and e.status not in (429, 502, 503, 504):
                    raise
                unanswered_since = unanswered_since or time.monotonic()
                if time.monotonic() - unanswered_since > outage:
                    raise
            else:
                if on_progress is not None:
                    on_progress(job)
                if job["status"] in TERMINAL:
                    return job
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s; it goes on")
            time.sleep(delay)
            delay = min(delay * 2, interval)

    def cancel(self, job_id: str) -> dict:
        """Ask the job to stop: chunks not yet started are skipped. The Job (it ends `cancelled`)."""
        return self.request("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")[1]

    def delete(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{quote(job_id, safe='')}")

    def results(self, job_id: str, dest: str | os.PathLike | IO[bytes], format: str | None = None, *,
                partial: bool = False, on_bytes: Callable[[int], None] | None = None) -> int:
        """Stream the job's results to a file (format from its extension unless given); the bytes written."""
        return self._download(job_id, "results", dest, format, RESULT_FORMATS, partial, on_bytes)

    def errors(self, job_id: str, dest: str | os.PathLike | IO[bytes] | None = None, format: str | None = None, *,
               partial: bool = False, on_bytes: Callable[[int], None] | None = None) -> list[dict] | int:
        """The job's row errors: written to `dest` (bytes written returned), or without it, as a list of dicts."""
        if dest is None:
            buffer = io.BytesIO()
            self._download(job_id, "errors", buffer, "jsonl", ERROR_FORMATS, partial, None)
            return [json.loads(line) for line in buffer.getvalue().splitlines() if line]
        return self._download(job_id, "errors", dest, format, ERROR_FORMATS, partial, on_bytes)

    def _download(self, job_id: str, kind: str, dest: str | os.PathLike | IO[bytes], fmt: str | None,
                  allowed: tuple[str, ...], partial: bool, on_bytes: Callable[[int], None] | None) -> int:
        if fmt is None:
            fmt = format_for(dest, allowed) if isinstance(dest, (str, os.PathLike)) else "jsonl"
        if fmt not in allowed:
            raise ValueError(f"{kind} come as {', '.join(allowed)}, not {fmt!r}")
        params = {"format": fmt, "partial": "true" if partial else None}
        response = self._send("GET", f"/v1/jobs/{quote(job_id, safe='')}/{kind}", params=params, stream=True,
                              timeout=(10, max(self.timeout, 600)))
        with response:
            if not isinstance(dest, (str, os.PathLike)):
                return _copy(response, dest, on_bytes, self.url)
            target = Path(dest)
            part = target.with_name(f".{target.name}.part")
            try:
                with open(part, "wb") as out:
                    written = _copy(response, out, on_bytes, self.url)
                part.replace(target)  # a broken download never leaves a file that looks complete
            finally:
                part.unlink(missing_ok=True)
            return written

    # -- schedules ---------------------------------------------------------------------------------

    def schedules(self) -> list[dict]:
        return self.request("GET", "/v1/schedules")[1]["data"]

    def run_schedule(self, name: str, date: str | None = None, rerun: bool = False) -> tuple[dict, bool]:
        """The run's job, and whether this call started it."""
        status, job = self.request("POST", f"/v1/schedules/{quote(name, safe='')}/run",
                                   {"date": date, "rerun": "true" if rerun else None})
        return job, status == 202


def _copy(response: requests.Response, out: IO[bytes], on_bytes: Callable[[int], None] | None, url: str) -> int:
    written = 0
    try:
        for block in response.iter_content(_BLOCK):
            out.write(block)
            written += len(block)
            if on_bytes is not None:
                on_bytes(written)
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        raise ServerUnreachable(f"the download from predq at {url} broke off: {_reason(e)}") from None
    return written


def _error_of(response: requests.Response) -> ApiError:
    """The ApiError an error answer describes: the contract's body, MLflow's or v2's, or the bare status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return ApiError(response.status_code, str(error.get("code", "error")), str(error["message"]),
                            error.get("details") if isinstance(error.get("details"), dict) else None)
        if "message" in body:
            return ApiError(response.status_code, str(body.get("error_code", "error")), str(body["message"]))
        if isinstance(error, str):
            return ApiError(response.status_code, "error", error)
    reason = response.reason or "error"
    return ApiError(response.status_code, "http_error", f"{response.url} answered {response.status_code} {reason}")


def _reason(e: Exception) -> str:
    """The innermost cause of a connection error, without urllib3's object reprs."""
    inner: BaseException = e
    while inner.__context__ is not None or getattr(inner, "reason", None) is not None:
        nxt = getattr(inner, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = inner.__context__
        if nxt is None or nxt is inner:
            break
        inner = nxt
    text = str(inner)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return text.split(": ", 1)[-1] if "object at 0x" in text else text
