"""Requests per key per minute, counted in Redis so the limit holds across web processes and machines.

A sliding-window counter (as Cloudflare's): one counter per key per fixed window, and a request is allowed
while `previous window's count x the share of it still inside the last minute + this window's count` stays
under the limit. Refused requests are not counted, so a client that waits out Retry-After gets in.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from shared import keys

log = logging.getLogger(__name__)

# KEYS: this window's counter, the previous window's. ARGV: limit, weight of the previous window, counter TTL.
_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[2]) + current + 1 <= tonumber(ARGV[1]) then
  current = redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {1, current, previous}
end
return {0, current, previous}
"""


def counter_key(name: str, window: int) -> str:
    """String: requests of one key in one window; the hash tag keeps a key's windows in one cluster slot."""
    return f"{keys.PREFIX}:ratelimit:{{{name}}}:{window}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: int = 0   # whole seconds until one more request fits (when refused)


def seconds_until_free(limit: int, window: float, elapsed: float, current: int, previous: int) -> float:
    """How long until `previous x weight + current + 1 <= limit` holds, no more requests being counted meanwhile."""
    if current + 1 <= limit:
        # Later in this window, once enough of the previous window has slid out of the last minute.
        fits_at = window - (limit - 1 - current) * window / previous
        return max(fits_at - elapsed, 0.0)
    # In the next window, where this window's count becomes the previous one's.
    return (window - elapsed) + window * (1 - (limit - 1) / current)


class RateLimiter:
    """`hit(name)` counts one request of a key; fails open (allows) while Redis does not answer."""

    def __init__(self, client: redis.Redis, per_minute: int, *, window: float = 60.0,
                 clock: Callable[[], float] = time.time, pause_after_error: float = 5.0):
        self.r = client
        self.limit = per_minute
        self.window = window
        self.clock = clock
        self.pause_after_error = pause_after_error
        self._hit = client.register_script(_HIT)
        self._lock = threading.Lock()
        self._down_until = 0.0   # while Redis is failing, skip it rather than slow every request down
        self._down = False

    def hit(self, name: str) -> Decision:
        if self.limit <= 0:
            return Decision(True)
        now = self.clock()
        if now < self._down_until:
            return Decision(True)
        index, into = divmod(now, self.window)
        index = int(index)
        try:
            allowed, current, previous = self._hit(
                keys=[counter_key(name, index), counter_key(name, index - 1)],
                args=[self.limit, repr((self.window - into) / self.window), math.ceil(self.window * 2)])
        except redis.RedisError as e:
            with self._lock:
                self._down_until = now + self.pause_after_error
                if not self._down:
                    self._down = True
                    log.warning("rate limiter: Redis does not answer (%s); requests are not limited until it does",
                                type(e).__name__)
            return Decision(True)
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.info("rate limiter: Redis answers again; limits apply")
        if allowed:
            return Decision(True)
        wait = seconds_until_free(self.limit, self.window, into, int(current), int(previous))
        return Decision(False, max(1, math.ceil(wait)))
