"""A small client for predq's HTTP API (what the `predq` command uses; importable by users)."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ApiError(Exception):
    """An error answer from the service, with its status and the contract's error code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{message} ({status} {code})")
        self.status, self.code, self.message = status, code, message


class Client:
    """predq at `url` (default $PREDQ_URL or http://127.0.0.1:8000), with `api_key` (default $PREDQ_API_KEY)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60):
        self.url = (url or os.environ.get("PREDQ_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PREDQ_API_KEY")
        self.timeout = timeout

    def request(self, method: str, path: str, params: dict | None = None, body: Any = None) -> tuple[int, Any]:
        query = f"?{urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})}" if params else ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}{query}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())["error"]
                raise ApiError(e.code, error.get("code", "error"), error.get("message", str(e))) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(e.code, "http_error", str(e)) from None
        except urllib.error.URLError as e:
            raise ApiError(0, "unreachable", f"predq at {self.url} does not answer: {e.reason}") from None

    def schedules(self) -> list[dict]:
        return self.request("GET", "/v1/schedules")[1]["data"]

    def run_schedule(self, name: str, date: str | None = None, rerun: bool = False) -> tuple[dict, bool]:
        """The run's job, and whether this call started it."""
        status, job = self.request("POST", f"/v1/schedules/{urllib.parse.quote(name)}/run",
                                   {"date": date, "rerun": "true" if rerun else None})
        return job, status == 202

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}")[1]
