"""Backpressure: refuse new work before Redis runs out of memory, rather than fail running jobs."""
from __future__ import annotations

import threading
import time

import redis

from shared.errors import PredqError


class StoreFull(PredqError):
    status, code = 503, "store_full"


class Capacity:
    """Compares Redis memory use with its limit (maxmemory, else STORE_MAX_BYTES), at most once a second."""

    def __init__(self, client: redis.Redis, *, max_bytes: int, full_fraction: float, retry_after: int = 30):
        self.r = client
        self.max_bytes = max_bytes
        self.full_fraction = full_fraction
        self.retry_after = retry_after
        self._checked_at = 0.0
        self._full: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise StoreFull (503) when memory use is past the threshold."""
        with self._lock:
            if time.monotonic() - self._checked_at > 1.0:
                info = self.r.info("memory")
                limit = int(info.get("maxmemory") or 0) or self.max_bytes
                used = int(info["used_memory"])
                self._full = (used, limit) if limit and used > self.full_fraction * limit else None
                self._checked_at = time.monotonic()
            full = self._full
        if full:
            used, limit = full
            raise StoreFull(f"The job store is {used / limit:.0%} full ({used >> 20} of {limit >> 20} MiB); retry later, "
                            "when finished jobs have been downloaded, deleted or have expired.",
                            headers={"Retry-After": str(self.retry_after)})
