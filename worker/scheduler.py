"""The beat scheduler: RedBeat (state in Redis, one active beat behind a lock) that rides out Redis outages."""
from __future__ import annotations

import logging

import redis
from redbeat import RedBeatScheduler

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


class Scheduler(RedBeatScheduler):
    """RedBeat exits when Redis is unreachable; this one waits for Redis and carries on, lock and all."""

    def tick(self, *args, **kwargs) -> float:
        try:
            return super().tick(*args, **kwargs)
        except redis.exceptions.LockNotOwnedError:
            # Redis came back without our lock (it expired meanwhile): queue up for it like a starting beat,
            # so that two beats never fire together.
            log.warning("beat: lost the scheduler lock while Redis was away; waiting to take it again")
            self.lock.acquire(blocking=True)
            log.info("beat: holding the scheduler lock again")
            return RETRY_SECONDS
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError) as e:
            log.warning("beat: Redis unavailable (%s); retrying in %.0f s", type(e).__name__, RETRY_SECONDS)
            return RETRY_SECONDS
