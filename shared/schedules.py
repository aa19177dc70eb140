"""Schedules as data: nightly runs read from a TOML or YAML file, and the slots their cron expressions make.

A *slot* is one firing of a schedule (an instant, kept in UTC); its logical *date* is the slot's date in the
schedule's timezone minus `date_offset` days (tonight's 02:00 slot scores yesterday).
"""
from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

UTC = dt.UTC


class ScheduleFileError(ValueError):
    """A schedules file that cannot be used; the message names the schedule and the field."""


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id_column: str | None = Field(None, min_length=1)
    probabilities: bool = False
    chunk_size: int | None = Field(None, ge=1)
    max_error_rate: float | None = Field(None, ge=0, le=1)


class Schedule(BaseModel):
    """One nightly scoring definition."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    cron: str = Field(description="5 fields (minute first), or 6 with seconds first.")
    timezone: str = "UTC"
    date_offset: int = Field(1, ge=0, description="Days between a slot's date and the logical date it scores.")
    model: str = Field(min_length=1)
    version: str | None = None
    source: str = Field(min_length=1, description="URI template; {date} is the logical date, YYYY-MM-DD.")
    output: str = Field(min_length=1, description="URI template of the folder the run's files go to.")
    format: Literal["parquet", "csv"] = "parquet"
    options: RunOptions = RunOptions()
    overlap: Literal["wait", "skip"] = Field("wait", description="When the previous run still runs.")
    catchup: Literal["latest", "all"] = Field("latest", description="After downtime: the latest missed run, or all.")
    max_catchup: int = Field(31, ge=1)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        fields = v.split()
        if len(fields) not in (5, 6) or not croniter.is_valid(v, second_at_beginning=len(fields) == 6):
            raise ValueError(f"{v!r} is not a cron expression of 5 fields (or 6, seconds first)")
        return v

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown timezone {v!r}") from e
        return v

    @field_validator("source", "output")
    @classmethod
    def _valid_template(cls, v: str) -> str:
        try:
            v.format(date="2000-01-01")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{date}} may be used in {v!r}") from e
        return v

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _iter(self, start_local: dt.datetime) -> croniter:
        return croniter(self.cron, start_local, second_at_beginning=len(self.cron.split()) == 6)

    def _to_utc(self, local: dt.datetime) -> dt.datetime:
        # fold=0: a wall time that occurs twice (autumn) fires once, at its first occurrence; one that does not
        # exist (spring) maps past the gap and fires once. Daylight saving thus neither skips nor doubles a run.
        return local.replace(tzinfo=self.tz, fold=0).astimezone(UTC)

    def _start(self, after: dt.datetime) -> dt.datetime:
        """The local wall time to iterate from: an hour earlier right after a clock jump, when the slot that the
        jump moved forward (02:30 that became 03:30) lies at a wall time before `after`'s."""
        earlier = after - dt.timedelta(hours=1)
        if earlier.astimezone(self.tz).utcoffset() != after.astimezone(self.tz).utcoffset():
            after = earlier
        return after.astimezone(self.tz).replace(tzinfo=None)

    def slots_between(self, after: dt.datetime, until: dt.datetime) -> list[dt.datetime]:
        """Slots s with after < s <= until, in order (UTC)."""
        it = self._iter(self._start(after))
        out = []
        while True:
            slot = self._to_utc(it.get_next(dt.datetime))
            if slot > until:
                return out
            if slot > after and (not out or slot > out[-1]):
                out.append(slot)

    def next_slot(self, now: dt.datetime) -> dt.datetime:
        it = self._iter(self._start(now))
        while True:
            slot = self._to_utc(it.get_next(dt.datetime))
            if slot > now:
                return slot

    def logical_date(self, slot: dt.datetime) -> dt.date:
        return slot.astimezone(self.tz).date() - dt.timedelta(days=self.date_offset)

    def slot_for_date(self, date: dt.date) -> dt.datetime:
        """The first slot whose logical date is `date` (what a manual run for that date stands for)."""
        day = date + dt.timedelta(days=self.date_offset)
        start = dt.datetime.combine(day, dt.time(0), self.tz).astimezone(UTC) - dt.timedelta(seconds=1)
        slot = self.next_slot(start)
        if self.logical_date(slot) != date:
            raise ValueError(f"schedule {self.name!r} has no slot for {date.isoformat()}")
        return slot

    def source_for(self, date: dt.date) -> str:
        return self.source.format(date=date.isoformat())

    def output_for(self, date: dt.date) -> str:
        return self.output.format(date=date.isoformat())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "cron": self.cron, "timezone": self.timezone, "model": self.model,
                "source": self.source, "output": self.output}


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(schedule)"


def parse_schedules(data: Any, origin: str = "schedules file") -> dict[str, Schedule]:
    """Schedules from parsed TOML/YAML: a list under `schedule` (TOML's [[schedule]]) or `schedules`."""
    if not isinstance(data, dict):
        raise ScheduleFileError(f"{origin}: expected a table with a list of schedules")
    entries = data.get("schedule", data.get("schedules", []))
    if not isinstance(entries, list):
        raise ScheduleFileError(f"{origin}: 'schedule' must be a list of tables ([[schedule]])")
    found: dict[str, Schedule] = {}
    for position, entry in enumerate(entries, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"schedule {name!r}" if name else f"schedule #{position}"
        try:
            schedule = Schedule.model_validate(entry)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            raise ScheduleFileError(f"{origin}: {label}: field '{_field_path(err['loc'])}': {err['msg']}") from e
        if schedule.name in found:
            raise ScheduleFileError(f"{origin}: {label}: field 'name': another schedule has this name")
        found[schedule.name] = schedule
    return found


def load_schedules(path: str | Path | None) -> dict[str, Schedule]:
    """The schedules in a TOML (.toml) or YAML (.yaml, .yml) file; none when no file is configured."""
    if not path:
        return {}
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScheduleFileError(f"{path}: cannot be read ({e.strerror})") from e
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = tomllib.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's fault
        raise ScheduleFileError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'}: {e}") from e
    return parse_schedules(data, str(path))
