"""How durable an acknowledged write is: WAITAOF where the server has it, said once in the log otherwise."""
from __future__ import annotations

import logging
import threading

import redis

log = logging.getLogger(__name__)


class Durability:
    """Waits for the append-only file to hold a write before a client is told about it (job created, finished)."""

    def __init__(self, client: redis.Redis, timeout_ms: int = 1000):
        self.r = client
        self.timeout_ms = timeout_ms
        self.mode: str | None = None  # "waitaof", "fsync_everysec" or "none" once known
        self._lock = threading.Lock()

    def _detect(self) -> str:
        try:
            appendonly = self.r.config_get("appendonly").get("appendonly")
        except redis.ResponseError:  # CONFIG renamed or disabled (managed Redis)
            appendonly = None
        try:
            self.r.execute_command("WAITAOF", 0, 0, 0)
            has_waitaof = True
        except redis.ResponseError as e:
            has_waitaof = "unknown command" not in str(e).lower()
        if appendonly == "no":
            log.warning("Redis runs without an append-only file: a Redis restart loses every job, chunk and result; "
                        "run it with appendonly yes")
            return "none"
        if not has_waitaof:
            log.warning("Redis has no WAITAOF (it is older than 7.2): a job created or finished in the last second "
                        "before a Redis crash may be lost (appendfsync everysec)")
            return "fsync_everysec"
        log.info("job creation and completion wait for the append-only file (WAITAOF)")
        return "waitaof"

    def wait(self) -> None:
        """Block until the local append-only file has every write made so far (or the timeout passes)."""
        if self.mode is None:
            with self._lock:
                if self.mode is None:
                    self.mode = self._detect()
        if self.mode != "waitaof":
            return
        local, _ = self.r.execute_command("WAITAOF", 1, 0, self.timeout_ms)
        if int(local) < 1:
            log.warning("the append-only file did not confirm a write within %d ms", self.timeout_ms)
