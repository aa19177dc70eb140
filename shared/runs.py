"""Runs of schedules: each slot is claimed once, whoever asks (two beat processes, a manual trigger)."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from shared import keys
from shared.jobs import Job, JobOptions, JobStore
from shared.readers import detect_format
from shared.registry import Registry
from shared.schedules import Schedule
from shared.sources import check_allowed

log = logging.getLogger(__name__)

_PENDING = "pending:"


@dataclass
class RunContext:
    """What starting a run needs: the store, the models, the allowed roots and a way to send the read task."""

    store: JobStore
    registry: Registry
    source_roots: list[str]
    window: int
    send_read: Callable[[str], None]
    result_ttl: int


def slot_key(schedule: Schedule, slot: dt.datetime) -> str:
    return keys.schedule_slot(schedule.name, slot.astimezone(dt.UTC).isoformat())


def create_source_job(ctx: RunContext, *, model: str, version: str | None, source: str, options: JobOptions,
                      metadata: dict, run: dict | None = None, owner: str | None = None) -> Job:
    """A job whose input a worker reads from `source`; problems found there end it `failed`.

    `owner` is the API key that asked for it (scheduled runs have none: admin keys see them).
    """
    check_allowed(source, ctx.source_roots)
    fmt = detect_format(source.split("?")[0], None)
    mv = ctx.registry.get(model, version)
    job_id = ctx.store.create(model=mv.name, version=mv.version, sha256=mv.sha256, options=options, metadata=metadata,
                              source_format=fmt, window=ctx.window, source=source, run=run, owner=owner)
    ctx.send_read(job_id)
    job = ctx.store.get(job_id)
    assert job is not None
    return job


def _previous_running(ctx: RunContext, schedule: Schedule) -> Job | None:
    last = ctx.store.r.zrevrange(keys.schedule_runs(schedule.name), 0, 0)
    job = ctx.store.get(last[0].decode()) if last else None
    return job if job is not None and not job.status.terminal else None


def start_run(ctx: RunContext, schedule: Schedule, slot: dt.datetime, *, trigger: str,
              rerun: bool = False) -> tuple[Job | None, bool]:
    """Start the run of one slot, once: (job, True) when this call made it, (existing job, False) otherwise.

    A scheduled trigger follows the schedule's overlap policy while its previous run still runs: `wait`
    returns (None, False) so that a later tick tries again; `skip` records the slot as skipped.
    """
    r = ctx.store.r
    key = slot_key(schedule, slot)
    lease = _PENDING + os.urandom(8).hex()
    if not r.set(key, lease, nx=True, ex=60):
        existing = _wait_for_claim(r, key)
        skipped = existing is not None and existing.startswith("skipped")
        if existing and not skipped and not rerun:
            return ctx.store.get(existing), False
        if existing is None:  # the other claim was given up (overlap wait, or a failure): try once more
            if not r.set(key, lease, nx=True, ex=60):
                return None, False
        elif skipped and trigger == "schedule" and not rerun:
            return None, False
        else:  # a rerun, or a manual run of a slot the schedule skipped: take the slot over for the new run
            r.set(key, lease, ex=60)
    try:
        if trigger == "schedule" and not rerun:
            previous = _previous_running(ctx, schedule)
            if previous is not None and schedule.overlap == "wait":
                r.delete(key)
                return None, False
            if previous is not None:
                r.set(key, f"skipped:previous run {previous.id} still running", ex=ctx.result_ttl)
                r.lpush(keys.schedule_skipped(schedule.name), json.dumps(
                    {"slot": slot.isoformat(), "reason": f"previous run {previous.id} still running",
                     "at": time.time()}))
                r.ltrim(keys.schedule_skipped(schedule.name), 0, 99)
                log.warning("schedule run skipped: previous run still running",
                            extra={"schedule": schedule.name, "slot": slot.isoformat(), "job_id": previous.id})
                return None, False
        date = schedule.logical_date(slot)
        run = {"name": schedule.name, "slot": slot.isoformat(), "date": date.isoformat(), "trigger": trigger,
               "output": schedule.output_for(date), "format": schedule.format}
        options = JobOptions(**schedule.options.model_dump())
        job = create_source_job(ctx, model=schedule.model, version=schedule.version, source=schedule.source_for(date),
                                options=options, metadata={"schedule": schedule.name, "date": date.isoformat()},
                                run=run)
    except BaseException:
        r.delete(key)
        raise
    with r.pipeline(transaction=True) as p:
        p.set(key, job.id, ex=ctx.result_ttl)
        p.zadd(keys.schedule_runs(schedule.name), {job.id: slot.timestamp()})
        p.execute()
    log.info("schedule run started", extra={"schedule": schedule.name, "slot": slot.isoformat(), "job_id": job.id,
                                            "trigger": trigger})
    return job, True


def _wait_for_claim(r: redis.Redis, key: str, timeout: float = 10.0) -> str | None:
    """What another process's claim became: a job id, a skip, or None if it gave up."""
    deadline = time.monotonic() + timeout
    while True:
        value = r.get(key)
        if value is None:
            return None
        text = value.decode()
        if not text.startswith(_PENDING) or time.monotonic() > deadline:
            return None if text.startswith(_PENDING) else text
        time.sleep(0.05)


def due_slots(r: redis.Redis, schedule: Schedule, now: dt.datetime) -> list[dt.datetime]:
    """Slots to run now: since the last one handled (or since the schedule was first seen), latest or all."""
    mark_key = keys.schedule_mark(schedule.name)
    r.set(mark_key, now.isoformat(), nx=True)  # first sight: nothing before now is due
    mark = dt.datetime.fromisoformat(r.get(mark_key).decode())
    slots = schedule.slots_between(mark, now)
    return slots[-1:] if schedule.catchup == "latest" else slots[-schedule.max_catchup:]


def tick(ctx: RunContext, schedules: dict[str, Schedule], now: dt.datetime | None = None) -> list[str]:
    """Start every due run of every schedule (beat calls this every few seconds); returns the jobs started."""
    now = now or dt.datetime.now(dt.UTC)
    started = []
    for schedule in schedules.values():
        for slot in due_slots(ctx.store.r, schedule, now):
            try:
                job, created = start_run(ctx, schedule, slot, trigger="schedule")
            except Exception:  # noqa: BLE001 - one broken schedule must not stop the others
                log.exception("schedule run could not start", extra={"schedule": schedule.name})
                break
            if job is None and not ctx.store.r.exists(slot_key(schedule, slot)):
                break  # waiting for the previous run: try this slot again on a later tick
            _advance_mark(ctx.store.r, schedule, slot)
            if created:
                started.append(job.id)
    return started


_ADVANCE = """
local current = redis.call('GET', KEYS[1])
if not current or current < ARGV[1] then redis.call('SET', KEYS[1], ARGV[1]) end
"""


def _advance_mark(r: redis.Redis, schedule: Schedule, slot: dt.datetime) -> None:
    # ISO strings of UTC instants sort as the instants do, so the mark only moves forward.
    r.eval(_ADVANCE, 1, keys.schedule_mark(schedule.name), slot.astimezone(dt.UTC).isoformat())


def last_run(store: JobStore, schedule: Schedule) -> dict | None:
    last = store.r.zrevrange(keys.schedule_runs(schedule.name), 0, 0)
    job = store.get(last[0].decode()) if last else None
    if job is None or job.run is None:
        return None
    return {"slot": job.run["slot"], "date": job.run["date"], "job_id": job.id, "status": job.status.value}


def recent_skips(store: JobStore, schedule: Schedule, limit: int = 10) -> list[dict]:
    """The latest slots skipped because the previous run still ran (overlap = "skip"), newest first."""
    return [json.loads(raw) for raw in store.r.lrange(keys.schedule_skipped(schedule.name), 0, limit - 1)]
