"""Scheduled runs: the schedules, and running one for a date by hand."""
from __future__ import annotations

import datetime as dt

from flask import Blueprint, Response, request

from api import schemas
from api.openapi import operation, path, query
from api.parsing import parse_bool
from api.responses import json_response
from api.services import services
from shared.errors import InvalidParameter, ModelNotFound, PredqError
from shared.jobs import rfc3339
from shared.runs import last_run, recent_skips, start_run
from shared.schedules import Schedule

bp = Blueprint("schedules", __name__)


class ScheduleNotFound(PredqError):
    status, code = 404, "schedule_not_found"


class RunInProgress(PredqError):
    status, code = 409, "run_in_progress"



def _schedule(name: str) -> Schedule:
    schedule = services().schedules.get(name)
    if schedule is None:
        known = ", ".join(sorted(services().schedules)) or "none are configured"
        raise ScheduleNotFound(f"No schedule named {name!r}; the schedules are: {known}.")
    return schedule


@bp.get("/v1/schedules")
@operation("get", "/v1/schedules", summary="List schedules", responses={200: schemas.ScheduleList})
def list_schedules() -> Response:
    """Every schedule with its next run, its last run and the slots it skipped lately (overlap = "skip")."""
    svc = services()
    now = dt.datetime.now(dt.UTC)
    data = [{**s.describe(), "next_run_at": rfc3339(s.next_slot(now).timestamp()), "last_run": last_run(svc.store, s),
             "skipped": recent_skips(svc.store, s)} for s in svc.schedules.values()]
    return json_response({"data": data})


@bp.post("/v1/schedules/<name>/run")
@operation("post", "/v1/schedules/{name}/run", summary="Run a schedule for a date",
           params=[path("name"),
                   query("date", {"type": "string", "format": "date"}, "The logical date; the latest when left out."),
                   query("rerun", {"type": "boolean"}, "Start a new run even if the date already ran.")],
           responses={200: schemas.Job, 202: schemas.Job, 400: None, 403: None, 404: None, 409: None, 422: None})
def run_schedule(name: str) -> Response:
    """202 with a new run, or 200 with the run that date already has (unless rerun=true)."""
    svc = services()
    schedule = _schedule(name)
    rerun = parse_bool("rerun", request.args.get("rerun"))
    raw = request.args.get("date")
    try:
        if raw:
            slot = schedule.slot_for_date(dt.date.fromisoformat(raw))
        else:
            slots = schedule.slots_between(dt.datetime.now(dt.UTC) - dt.timedelta(days=400), dt.datetime.now(dt.UTC))
            if not slots:
                raise ValueError("the schedule has not fired in the last 400 days; give a date")
            slot = slots[-1]
    except ValueError as e:
        raise InvalidParameter(f"date: {e}" if raw is None else f"date {raw!r} is not a date of this schedule "
                               f"(YYYY-MM-DD): {e}",
                               details={"fields": [{"name": "date", "code": "invalid_parameter", "message": str(e)}]}) from e
    try:
        job, created = start_run(svc.run_context(), schedule, slot, trigger="manual", rerun=rerun)
    except ModelNotFound as e:
        raise PredqError(e.message) from e
    if job is None:
        raise PredqError("The run for this date is being started by another request; retry in a moment.")
    return json_response(job.to_public(), 202 if created else 200, {"Location": f"/v1/jobs/{job.id}"})
