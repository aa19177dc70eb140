"""What the web process holds for its lifetime: settings, the Redis client, the job store, the registry."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import redis
from celery import Celery
from flask import current_app

from shared.capacity import Capacity
from shared.chunkstore import open_chunk_store
from shared.dispatch import make_celery, send_read
from shared.durability import Durability
from shared.idempotency import IdempotencyKeys
from shared.jobs import JobStore
from shared.redisio import connect
from shared.registry import Registry
from shared.runs import RunContext
from shared.schedules import Schedule, load_schedules
from shared.settings import Settings


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    registry: Registry
    celery: Celery
    idempotency: IdempotencyKeys
    capacity: Capacity
    durability: Durability
    schedules: dict[str, Schedule]

    def run_context(self) -> RunContext:
        return RunContext(store=self.store, registry=self.registry, source_roots=self.settings.source_roots,
                          window=self.settings.JOB_QUEUE_WINDOW, send_read=partial(send_read, self.celery),
                          result_ttl=self.settings.RESULT_TTL)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        client = connect(settings.REDIS_URL, socket_timeout=10, socket_connect_timeout=2,
                                      health_check_interval=30)
        return cls(
            settings=settings,
            redis=client,
            store=JobStore(client, result_ttl=settings.RESULT_TTL, max_attempts=settings.MAX_CHUNK_ATTEMPTS,
                           stale_after=settings.CHUNK_TIME_LIMIT * 2, blobs=open_chunk_store(settings.CHUNK_STORE_URL)),
            registry=Registry(settings.MODELS_DIR, settings.MODEL_RESCAN_SECONDS),
            celery=make_celery(settings),
            idempotency=IdempotencyKeys(client, lease_seconds=settings.IDEMPOTENCY_LEASE_SECONDS, ttl=settings.RESULT_TTL),
            capacity=Capacity(client, max_bytes=settings.STORE_MAX_BYTES, full_fraction=settings.STORE_FULL_FRACTION),
            durability=Durability(client, settings.WAITAOF_TIMEOUT_MS),
            schedules=load_schedules(settings.SCHEDULES_FILE),
        )


def services() -> Services:
    return current_app.extensions["predq"]


def package_version() -> str:
    """predq's version, as installed."""
    try:
        return version("predq")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
