"""Schedules without servers: the file format, slots across daylight saving, logical dates, allowed sources,
and starting runs (first sight, catch-up, overlap, reruns) against fakeredis."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import fakeredis
import pytest

from shared import keys
from shared.jobs import JobStore, Status
from shared.registry import Registry
from shared.runs import RunContext, due_slots, slot_key, start_run, tick
from shared.schedules import Schedule, ScheduleFileError, load_schedules, parse_schedules
from shared.sources import SourceNotAllowed, check_allowed
from tests.support.models import install_test_models

UTC = dt.UTC


def entry(**fields) -> dict:
    base = {"name": "nightly", "cron": "0 2 * * *", "model": "fussy", "source": "/data/in/{date}.csv",
            "output": "/data/out/{date}/"}
    base.update(fields)
    return base


def one(**fields) -> Schedule:
    return parse_schedules({"schedule": [entry(**fields)]})["nightly"]


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------
# The schedules file
# ---------------------------------------------------------------------------------------------------

TOML = """
[[schedule]]
name = "nightly-fussy"
cron = "0 2 * * *"
timezone = "Europe/Berlin"
date_offset = 1
model = "fussy"
version = "v1"
source = "file:///data/in/{date}.csv"
output = "file:///data/out/{date}/"
format = "csv"
overlap = "skip"
catchup = "all"
max_catchup = 5
options = { id_column = "id", probabilities = true, max_error_rate = 0.01 }

[[schedule]]
name = "every-5s"
cron = "*/5 * * * * *"
model = "fussy"
source = "/data/in/{date}.parquet"
output = "/data/out/{date}/"
"""

YAML = """
schedules:
  - name: nightly-fussy
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    date_offset: 1
    model: fussy
    version: v1
    source: file:///data/in/{date}.csv
    output: file:///data/out/{date}/
    format: csv
    overlap: skip
    catchup: all
    max_catchup: 5
    options: {id_column: id, probabilities: true, max_error_rate: 0.01}
  - name: every-5s
    cron: "*/5 * * * * *"
    model: fussy
    source: /data/in/{date}.parquet
    output: /data/out/{date}/
"""


@pytest.mark.parametrize("filename,text", [("schedules.toml", TOML), ("schedules.yaml", YAML), ("schedules.yml", YAML)])
def test_a_schedules_file_in_toml_or_yaml(tmp_path, filename, text):
    """TOML's [[schedule]] and YAML's `schedules:` list give the same schedules, with defaults filled in."""
    path = tmp_path / filename
    path.write_text(text)
    found = load_schedules(path)
    assert list(found) == ["nightly-fussy", "every-5s"]
    nightly, fast = found["nightly-fussy"], found["every-5s"]
    assert (nightly.cron, nightly.timezone, nightly.date_offset, nightly.model, nightly.version) == \
        ("0 2 * * *", "Europe/Berlin", 1, "fussy", "v1")
    assert (nightly.format, nightly.overlap, nightly.catchup, nightly.max_catchup) == ("csv", "skip", "all", 5)
    assert nightly.options.id_column == "id" and nightly.options.probabilities is True
    assert nightly.options.max_error_rate == 0.01
    assert nightly.source_for(dt.date(2026, 11, 28)) == "file:///data/in/2026-11-28.csv"
    assert nightly.output_for(dt.date(2026, 11, 28)) == "file:///data/out/2026-11-28/"
    # defaults
    assert (fast.timezone, fast.date_offset, fast.format, fast.overlap, fast.catchup, fast.version) == \
        ("UTC", 1, "parquet", "wait", "latest", None)
    assert fast.options.id_column is None and fast.options.probabilities is False


def test_no_schedules_file_means_no_schedules():
    assert load_schedules(None) == {}
    assert load_schedules("") == {}


def test_an_unreadable_or_unparseable_file_is_named(tmp_path):
    with pytest.raises(ScheduleFileError, match="missing.toml"):
        load_schedules(tmp_path / "missing.toml")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[[schedule]\nname = ")
    with pytest.raises(ScheduleFileError, match=r"bad\.toml.*TOML"):
        load_schedules(bad_toml)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("schedules: [\n  - name: x\n  cron: : :")
    with pytest.raises(ScheduleFileError, match=r"bad\.yaml.*YAML"):
        load_schedules(bad_yaml)


INVALID_FIELDS = [
    pytest.param({"cron": "61 * * * *"}, "cron", id="cron-out-of-range"),
    pytest.param({"cron": "every night"}, "cron", id="cron-words"),
    pytest.param({"cron": "0 2 * *"}, "cron", id="cron-four-fields"),
    pytest.param({"cron": "0 0 2 * * * *"}, "cron", id="cron-seven-fields"),
    pytest.param({"timezone": "Mars/Olympus_Mons"}, "timezone", id="unknown-timezone"),
    pytest.param({"timezone": "Europe/Berlinn"}, "timezone", id="misspelt-timezone"),
    pytest.param({"schedule_time": "02:00"}, "schedule_time", id="unknown-key"),
    pytest.param({"source": "/data/in/{date}/{hour}.csv"}, "source", id="source-other-placeholder"),
    pytest.param({"output": "/data/out/{day}/"}, "output", id="output-other-placeholder"),
    pytest.param({"source": "/data/in/{0}.csv"}, "source", id="source-positional-placeholder"),
    pytest.param({"overlap": "queue"}, "overlap", id="bad-overlap"),
    pytest.param({"catchup": "none"}, "catchup", id="bad-catchup"),
    pytest.param({"format": "xlsx"}, "format", id="bad-format"),
    pytest.param({"date_offset": -1}, "date_offset", id="negative-date-offset"),
    pytest.param({"max_catchup": 0}, "max_catchup", id="zero-max-catchup"),
    pytest.param({"options": {"id_column": "id", "colour": "red"}}, "options.colour", id="unknown-option"),
]


@pytest.mark.parametrize("fields,field", INVALID_FIELDS)
def test_every_invalid_field_names_the_schedule_and_the_field(fields, field):
    data = {"schedule": [entry(name="fine"), entry(name="broken", **fields)]}
    with pytest.raises(ScheduleFileError) as caught:
        parse_schedules(data, "schedules.toml")
    message = str(caught.value)
    assert "schedules.toml" in message
    assert "'broken'" in message, message
    assert f"field '{field}'" in message, message


@pytest.mark.parametrize("fields,field", INVALID_FIELDS[:7])
def test_an_invalid_field_in_a_file_names_the_file_schedule_and_field(tmp_path, fields, field):
    """The same through load_schedules, with the file's own syntax."""
    lines = ["[[schedule]]"] + [f"{k} = {json.dumps(v)}" for k, v in entry(name="broken", **fields).items()]
    path = tmp_path / "schedules.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScheduleFileError) as caught:
        load_schedules(path)
    message = str(caught.value)
    assert str(path) in message and "'broken'" in message and f"field '{field}'" in message, message


def test_a_missing_required_field_names_it():
    data = {"schedule": [{"name": "partial", "cron": "0 2 * * *", "source": "/in/{date}.csv", "output": "/out/"}]}
    with pytest.raises(ScheduleFileError, match=r"'partial'.*field 'model'"):
        parse_schedules(data)


def test_an_invalid_name_is_reported_as_the_name_field():
    with pytest.raises(ScheduleFileError, match=r"field 'name'"):
        parse_schedules({"schedule": [entry(name="has spaces and /slashes")]})


def test_duplicate_names_are_refused_naming_the_schedule():
    data = {"schedule": [entry(name="twice"), entry(name="other"), entry(name="twice", cron="0 3 * * *")]}
    with pytest.raises(ScheduleFileError) as caught:
        parse_schedules(data, "schedules.toml")
    message = str(caught.value)
    assert "'twice'" in message and "name" in message, message


def test_the_file_must_hold_a_list_of_schedules():
    with pytest.raises(ScheduleFileError):
        parse_schedules(["not", "a", "table"])
    with pytest.raises(ScheduleFileError, match="list"):
        parse_schedules({"schedule": {"name": "x"}})


# ---------------------------------------------------------------------------------------------------
# Slots and daylight saving
# ---------------------------------------------------------------------------------------------------

def _local_days(schedule: Schedule, slots: list[dt.datetime]) -> list[dt.date]:
    return [s.astimezone(schedule.tz).date() for s in slots]


@pytest.mark.parametrize("timezone,day,cron,wall", [
    # spring forward: 02:30 does not exist that day
    pytest.param("Europe/Berlin", dt.date(2026, 3, 29), "30 2 * * *", None, id="berlin-spring"),
    pytest.param("America/New_York", dt.date(2026, 3, 8), "30 2 * * *", None, id="new-york-spring"),
    # fall back: the wall time happens twice that day
    pytest.param("Europe/Berlin", dt.date(2026, 10, 25), "30 2 * * *", dt.time(2, 30), id="berlin-fall"),
    pytest.param("America/New_York", dt.date(2026, 11, 1), "30 1 * * *", dt.time(1, 30), id="new-york-fall"),
])
def test_daylight_saving_neither_skips_nor_doubles_a_daily_slot(timezone, day, cron, wall):
    """Around a transition every local day has exactly one slot, the transition day included."""
    schedule = one(cron=cron, timezone=timezone)
    tz = schedule.tz
    start = dt.datetime.combine(day - dt.timedelta(days=3), dt.time(0), tz).astimezone(UTC)
    end = dt.datetime.combine(day + dt.timedelta(days=4), dt.time(0), tz).astimezone(UTC)
    slots = schedule.slots_between(start, end)
    days = _local_days(schedule, slots)
    assert days == [day + dt.timedelta(days=k) for k in range(-3, 4)], [s.astimezone(tz).isoformat() for s in slots]
    assert slots == sorted(set(slots))
    (on_the_day,) = [s for s in slots if s.astimezone(tz).date() == day]
    local = on_the_day.astimezone(tz)
    if wall is None:
        # the wall time does not exist: the slot fires once, in the hour after the gap
        assert dt.time(3, 0) <= local.time() < dt.time(4, 0), local.isoformat()
        assert on_the_day == dt.datetime.combine(day, dt.time(3, 30), tz).astimezone(UTC)
    else:
        # the wall time happens twice: the slot fires once, at that wall time
        assert local.time() == wall, local.isoformat()
        assert local.replace(tzinfo=None).time() == wall
    # the day before and after fire at the cron's wall time
    for s in slots:
        if s.astimezone(tz).date() != day:
            assert s.astimezone(tz).time() == dt.time(int(cron.split()[1]), 30)


@pytest.mark.parametrize("timezone,day,cron", [
    ("Europe/Berlin", dt.date(2026, 3, 29), "30 2 * * *"),
    ("America/New_York", dt.date(2026, 3, 8), "30 2 * * *"),
    ("Europe/Berlin", dt.date(2026, 10, 25), "30 2 * * *"),
    ("America/New_York", dt.date(2026, 11, 1), "30 1 * * *"),
])
def test_next_slot_on_a_transition_day_agrees_with_slots_between(timezone, day, cron):
    schedule = one(cron=cron, timezone=timezone)
    tz = schedule.tz
    start = dt.datetime.combine(day, dt.time(0), tz).astimezone(UTC)
    end = start + dt.timedelta(days=3)
    slots = schedule.slots_between(start, end)
    cursor = start
    walked = []
    while True:
        nxt = schedule.next_slot(cursor)
        if nxt > end:
            break
        walked.append(nxt)
        cursor = nxt
    assert walked == slots
    # asking from every minute of the transition night never finds a second slot that day
    seen = set()
    minute = start
    while minute < start + dt.timedelta(hours=6):
        nxt = schedule.next_slot(minute)
        if nxt.astimezone(tz).date() == day:
            seen.add(nxt)
        minute += dt.timedelta(minutes=7)
    assert len(seen) == 1, seen


@pytest.mark.parametrize("timezone,day", [("Europe/Berlin", dt.date(2026, 3, 29)),
                                          ("America/New_York", dt.date(2026, 3, 8))])
def test_the_slot_after_a_spring_forward_gap_is_next_from_every_instant_before_it(timezone, day):
    """02:30 does not exist that day and fires at 03:30; asked at 03:10 (after the gap), the next slot is 03:30
    that day, not 02:30 the day after (GET /v1/schedules shows next_slot as next_run_at)."""
    schedule = one(cron="30 2 * * *", timezone=timezone)
    slot = dt.datetime.combine(day, dt.time(3, 30), schedule.tz).astimezone(UTC)
    for before in (dt.time(1, 0), dt.time(1, 59, 59), dt.time(3, 0), dt.time(3, 10), dt.time(3, 29, 59)):
        asked = dt.datetime.combine(day, before, schedule.tz).astimezone(UTC)
        assert schedule.next_slot(asked) == slot, f"asked at {asked.astimezone(schedule.tz).isoformat()}"
        assert schedule.slots_between(asked, slot) == [slot], f"after {asked.astimezone(schedule.tz).isoformat()}"


def test_slots_are_in_the_schedules_timezone():
    schedule = one(cron="0 2 * * *", timezone="Europe/Berlin")
    winter = schedule.slots_between(utc(2026, 1, 10), utc(2026, 1, 11))
    summer = schedule.slots_between(utc(2026, 7, 9, 12), utc(2026, 7, 10, 12))
    assert winter == [utc(2026, 1, 10, 1)]
    assert summer == [utc(2026, 7, 10, 0)]


def test_slots_between_is_exclusive_then_inclusive():
    schedule = one(cron="0 2 * * *")
    assert schedule.slots_between(utc(2026, 1, 1, 2), utc(2026, 1, 3, 2)) == [utc(2026, 1, 2, 2), utc(2026, 1, 3, 2)]
    assert schedule.slots_between(utc(2026, 1, 1, 2), utc(2026, 1, 2, 1, 59)) == []
    assert schedule.next_slot(utc(2026, 1, 1, 2)) == utc(2026, 1, 2, 2)
    assert schedule.next_slot(utc(2026, 1, 1, 1, 59, 59)) == utc(2026, 1, 1, 2)


def test_six_fields_put_seconds_first():
    every_5s = one(cron="*/5 * * * * *")
    assert every_5s.slots_between(utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 20)) == \
        [utc(2026, 1, 1, 0, 0, s) for s in (5, 10, 15, 20)]
    # "30 0 2 * * *": second 30, minute 0, hour 2 -- not minute 30 of hour 0
    daily = one(cron="30 0 2 * * *")
    assert daily.slots_between(utc(2026, 1, 1), utc(2026, 1, 3)) == [utc(2026, 1, 1, 2, 0, 30), utc(2026, 1, 2, 2, 0, 30)]
    assert daily.next_slot(utc(2026, 1, 1, 2, 0, 29)) == utc(2026, 1, 1, 2, 0, 30)
    # five fields: minute first
    five = one(cron="30 0 * * *")
    assert five.slots_between(utc(2026, 1, 1), utc(2026, 1, 2)) == [utc(2026, 1, 1, 0, 30)]


@pytest.mark.parametrize("offset,expected", [(0, dt.date(2026, 11, 29)), (1, dt.date(2026, 11, 28)),
                                             (2, dt.date(2026, 11, 27))])
def test_logical_date_is_the_slots_local_date_minus_the_offset(offset, expected):
    schedule = one(cron="0 2 * * *", timezone="Europe/Berlin", date_offset=offset)
    slot = dt.datetime(2026, 11, 29, 2, tzinfo=schedule.tz).astimezone(UTC)  # 01:00 UTC
    assert schedule.logical_date(slot) == expected
    assert schedule.slot_for_date(expected) == slot


def test_logical_date_uses_the_local_date_not_utcs():
    """00:30 in Berlin is still the previous day in UTC; the local day counts."""
    schedule = one(cron="30 0 * * *", timezone="Europe/Berlin", date_offset=0)
    slot = schedule.slot_for_date(dt.date(2026, 6, 15))
    assert slot == utc(2026, 6, 14, 22, 30)
    assert schedule.logical_date(slot) == dt.date(2026, 6, 15)
    ny = one(cron="0 23 * * *", timezone="America/New_York", date_offset=1)
    slot = ny.slot_for_date(dt.date(2026, 6, 15))
    assert slot == utc(2026, 6, 17, 3)  # 23:00 EDT on the 16th
    assert ny.logical_date(slot) == dt.date(2026, 6, 15)


def _days_to_check() -> list[dt.date]:
    """The 1st and 15th of every month of 2026, and the days around both transitions in Europe and the US."""
    days = {dt.date(2026, m, d) for m in range(1, 13) for d in (1, 15)}
    for centre in (dt.date(2026, 3, 8), dt.date(2026, 3, 29), dt.date(2026, 10, 25), dt.date(2026, 11, 1)):
        days.update(centre + dt.timedelta(days=k) for k in range(-2, 3))
    return sorted(days)


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("offset", [0, 1, 2])
@pytest.mark.parametrize("cron", ["0 2 * * *", "30 2 * * *", "30 1 * * *", "45 23 * * *", "0 0 * * *"])
def test_slot_for_date_round_trips(timezone, offset, cron):
    """The date's slot has that logical date, and the slot's date gives the slot back (transitions included)."""
    schedule = one(cron=cron, timezone=timezone, date_offset=offset)
    for day in _days_to_check():
        slot = schedule.slot_for_date(day)
        assert schedule.logical_date(slot) == day, (day, slot)
        assert schedule.slot_for_date(schedule.logical_date(slot)) == slot


def test_slot_for_date_of_a_sub_daily_schedule_is_the_days_first_slot():
    schedule = one(cron="*/2 * * * * *", date_offset=0)
    assert schedule.slot_for_date(dt.date(2026, 5, 1)) == utc(2026, 5, 1)
    hourly = one(cron="15 * * * *", timezone="Europe/Berlin", date_offset=1)
    assert hourly.slot_for_date(dt.date(2026, 5, 1)) == dt.datetime(2026, 5, 2, 0, 15, tzinfo=hourly.tz).astimezone(UTC)


def test_slot_for_a_date_the_schedule_never_fires_on_is_refused():
    weekdays = one(cron="0 2 * * 1-5", date_offset=0)
    assert weekdays.slot_for_date(dt.date(2026, 11, 27)) == utc(2026, 11, 27, 2)  # a Friday
    with pytest.raises(ValueError):
        weekdays.slot_for_date(dt.date(2026, 11, 28))  # a Saturday


# ---------------------------------------------------------------------------------------------------
# Allowed sources
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> dict[str, Path]:
    root = tmp_path / "data" / "in"
    (root / "sub").mkdir(parents=True)
    (root / "2026-11-28.csv").write_text("a\n1\n")
    (root / "sub" / "x.csv").write_text("a\n1\n")
    sibling = tmp_path / "data" / "in2"
    sibling.mkdir()
    (sibling / "x.csv").write_text("a\n1\n")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd.csv").write_text("a\n1\n")
    os.symlink(outside / "passwd.csv", root / "link.csv")
    os.symlink(outside, root / "linkdir")
    os.symlink(root / "sub" / "x.csv", root / "inner-link.csv")
    return {"root": root, "sibling": sibling, "outside": outside, "base": tmp_path}


def _refused(uri: str, roots: list[str]) -> None:
    with pytest.raises(SourceNotAllowed) as caught:
        check_allowed(uri, roots)
    assert caught.value.status == 403 and caught.value.code == "source_not_allowed"


def test_a_path_under_a_root_is_allowed(tree):
    root = str(tree["root"])
    for uri in (f"{root}/2026-11-28.csv", f"{root}/sub/x.csv", f"file://{root}/2026-11-28.csv",
                f"{root}/not-yet-there.csv", f"{root}/inner-link.csv"):
        assert check_allowed(uri, [root]) == uri
    # the root given as a file:// URI, or with a trailing slash
    assert check_allowed(f"{root}/sub/x.csv", [f"file://{root}"])
    assert check_allowed(f"file://{root}/sub/x.csv", [f"{root}/"])
    # any of several roots
    assert check_allowed(f"{tree['sibling']}/x.csv", [root, str(tree["sibling"])])


def test_dot_dot_is_refused(tree):
    root = str(tree["root"])
    _refused(f"{root}/../../secret/passwd.csv", [root])
    _refused(f"file://{root}/../in2/x.csv", [root])
    _refused(f"{root}/sub/../2026-11-28.csv", [root])  # even when it would stay inside


def test_a_percent_encoded_escape_is_refused(tree):
    root = str(tree["root"])
    _refused(f"file://{root}/%2e%2e/%2e%2e/secret/passwd.csv", [root])


def test_a_symlink_inside_a_root_pointing_outside_is_refused(tree):
    root = str(tree["root"])
    _refused(f"{root}/link.csv", [root])
    _refused(f"file://{root}/link.csv", [root])
    _refused(f"{root}/linkdir/passwd.csv", [root])


def test_a_sibling_whose_name_starts_with_the_roots_name_is_refused(tree):
    root = str(tree["root"])
    _refused(f"{tree['sibling']}/x.csv", [root])
    _refused(f"file://{tree['sibling']}/x.csv", [root])
    _refused(f"{root}2/x.csv", [root])
    _refused(f"{tree['sibling']}/x.csv", [root + "/"])


def test_paths_outside_every_root_or_relative_are_refused(tree):
    root = str(tree["root"])
    _refused(f"{tree['outside']}/passwd.csv", [root])
    _refused("/etc/passwd", [root])
    _refused("data/in/2026-11-28.csv", [root])
    _refused(f"s3://bucket{root}/x.csv", [root])


def test_s3_style_prefixes(tree):
    roots = ["s3://bucket/in", "gs://other/prefix/"]
    assert check_allowed("s3://bucket/in/2026-11-28.csv", roots)
    assert check_allowed("s3://bucket/in/sub/x.parquet", roots)
    assert check_allowed("gs://other/prefix/x.csv", roots)
    _refused("s3://bucket/in2/x.csv", roots)
    _refused("s3://bucket/input/x.csv", roots)
    _refused("s3://bucket/x.csv", roots)
    _refused("s3://other-bucket/in/x.csv", roots)
    _refused("gs://bucket/in/x.csv", roots)
    _refused("s3://bucket/in/../secret/x.csv", roots)
    _refused(f"{tree['root']}/2026-11-28.csv", roots)  # a local path is not under a bucket prefix


def test_no_roots_refuses_everything(tree):
    _refused(f"{tree['root']}/2026-11-28.csv", [])
    _refused("s3://bucket/in/x.csv", [])
    _refused("/", [])


# ---------------------------------------------------------------------------------------------------
# Runs on fakeredis
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("models")
    install_test_models(root)
    return Registry(root)


class Ctx:
    """A RunContext on fakeredis whose send_read records job ids; `finish_on_read` ends each job at once."""

    def __init__(self, registry: Registry, roots: list[str]):
        self.redis = fakeredis.FakeRedis()
        self.store = JobStore(self.redis, result_ttl=3600, max_attempts=3, stale_after=300)
        self.sent: list[str] = []
        self.finish_on_read = False
        self.ctx = RunContext(store=self.store, registry=registry, source_roots=roots, window=16,
                              send_read=self._send_read, result_ttl=3600)

    def _send_read(self, job_id: str) -> None:
        self.sent.append(job_id)
        if self.finish_on_read:
            self.finish(job_id)

    def finish(self, job_id: str) -> None:
        """End a job (no rows; failed) as a worker would when its source is gone."""
        self.store.stop(job_id, "fail", "invalid_file", "gone")
        self.store.finish_ingest(job_id, 0, 0)
        assert self.store.get(job_id).status.terminal

    def runs(self, name: str) -> list[tuple[str, dt.datetime]]:
        return [(m.decode(), dt.datetime.fromtimestamp(score, UTC))
                for m, score in self.redis.zrange(keys.schedule_runs(name), 0, -1, withscores=True)]

    def run_slots(self, name: str) -> list[dt.datetime]:
        return [dt.datetime.fromisoformat(self.store.get(j).run["slot"]) for j, _ in self.runs(name)]

    def mark(self, name: str) -> dt.datetime | None:
        raw = self.redis.get(keys.schedule_mark(name))
        return dt.datetime.fromisoformat(raw.decode()) if raw else None


@pytest.fixture
def fake(registry, tmp_path) -> Ctx:
    return Ctx(registry, [str(tmp_path / "in")])


def sched(tmp_path, **fields) -> Schedule:
    base = {"name": "nightly", "cron": "0 2 * * *", "model": "fussy", "date_offset": 1,
            "source": f"{tmp_path}/in/{{date}}.csv", "output": f"{tmp_path}/out/{{date}}/"}
    base.update(fields)
    return parse_schedules({"schedule": [base]})["nightly"]


def test_first_sight_runs_nothing_before_now(fake, tmp_path):
    """A schedule seen for the first time starts from now: the slots before it (years of them) are not due."""
    schedule = sched(tmp_path, catchup="all", max_catchup=31)
    now = utc(2026, 3, 10, 12)
    assert due_slots(fake.redis, schedule, now) == []
    assert tick(fake.ctx, {"nightly": schedule}, now) == []
    assert fake.sent == [] and fake.runs("nightly") == []
    assert fake.mark("nightly") == now
    # the next slot after first sight runs
    started = tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 1))
    assert len(started) == 1 and fake.sent == started
    job = fake.store.get(started[0])
    assert job.run["slot"] == utc(2026, 3, 11, 2).isoformat() and job.run["date"] == "2026-03-10"
    assert job.run["trigger"] == "schedule"
    assert job.source == f"{tmp_path}/in/2026-03-10.csv"
    assert job.to_public()["schedule"] == {"name": "nightly", "slot": utc(2026, 3, 11, 2).isoformat(),
                                           "date": "2026-03-10"}
    assert job.status == Status.QUEUED
    # a tick again at the same instant starts nothing more
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 5)) == []
    assert fake.mark("nightly") == utc(2026, 3, 11, 2)


def _seen_then_caught_up(fake: Ctx, schedule: Schedule, days_down: int) -> list[str]:
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10, 12)) == []  # first sight
    return tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10 + days_down, 12))


def test_missed_days_are_caught_up_once_with_catchup_latest(fake, tmp_path):
    schedule = sched(tmp_path, catchup="latest")
    started = _seen_then_caught_up(fake, schedule, 4)  # slots on the 11th..14th were missed
    assert len(started) == 1
    assert fake.run_slots("nightly") == [utc(2026, 3, 14, 2)]
    assert fake.store.get(started[0]).run["date"] == "2026-03-13"
    assert fake.mark("nightly") == utc(2026, 3, 14, 2)
    # later ticks the same day start nothing; the catch-up is not repeated
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 14, 13)) == []
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 14, 23)) == []
    assert len(fake.runs("nightly")) == 1
    for day in (11, 12, 13):
        assert not fake.redis.exists(slot_key(schedule, utc(2026, 3, day, 2)))


def test_missed_days_are_caught_up_each_with_catchup_all(fake, tmp_path):
    schedule = sched(tmp_path, catchup="all", max_catchup=31)
    fake.finish_on_read = True  # each run ends before the next slot is looked at
    started = _seen_then_caught_up(fake, schedule, 4)
    assert len(started) == 4
    assert fake.run_slots("nightly") == [utc(2026, 3, d, 2) for d in (11, 12, 13, 14)]
    assert [fake.store.get(j).run["date"] for j in started] == ["2026-03-10", "2026-03-11", "2026-03-12",
                                                                "2026-03-13"]
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 14, 13)) == []
    assert len(fake.runs("nightly")) == 4


def test_catchup_all_is_capped_by_max_catchup(fake, tmp_path):
    schedule = sched(tmp_path, catchup="all", max_catchup=3)
    fake.finish_on_read = True
    started = _seen_then_caught_up(fake, schedule, 10)
    assert len(started) == 3
    assert fake.run_slots("nightly") == [utc(2026, 3, d, 2) for d in (18, 19, 20)]  # the latest three
    assert fake.mark("nightly") == utc(2026, 3, 20, 2)
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 20, 13)) == []


def test_catchup_all_with_overlap_wait_runs_the_missed_slots_one_after_another(fake, tmp_path):
    schedule = sched(tmp_path, catchup="all", overlap="wait")
    now = utc(2026, 3, 13, 12)
    first = _seen_then_caught_up(fake, schedule, 3)
    assert len(first) == 1 and fake.run_slots("nightly") == [utc(2026, 3, 11, 2)]
    assert tick(fake.ctx, {"nightly": schedule}, now) == []  # the first still runs
    fake.finish(first[0])
    second = tick(fake.ctx, {"nightly": schedule}, now)
    assert len(second) == 1
    fake.finish(second[0])
    third = tick(fake.ctx, {"nightly": schedule}, now)
    assert len(third) == 1
    assert fake.run_slots("nightly") == [utc(2026, 3, d, 2) for d in (11, 12, 13)]
    fake.finish(third[0])
    assert tick(fake.ctx, {"nightly": schedule}, now) == []


def test_overlap_skip_records_the_skipped_slot(fake, tmp_path):
    schedule = sched(tmp_path, overlap="skip")
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10, 12)) == []
    (first,) = tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 1))
    # the first run still runs when the next slot comes
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 12, 2, 0, 1)) == []
    assert fake.runs("nightly") == [(first, utc(2026, 3, 11, 2))]
    assert fake.mark("nightly") == utc(2026, 3, 12, 2)  # handled: not tried again
    skipped = [json.loads(x) for x in fake.redis.lrange(keys.schedule_skipped("nightly"), 0, -1)]
    assert len(skipped) == 1
    assert skipped[0]["slot"] == utc(2026, 3, 12, 2).isoformat() and first in skipped[0]["reason"]
    value = fake.redis.get(slot_key(schedule, utc(2026, 3, 12, 2))).decode()
    assert value.startswith("skipped") and first in value
    # ticks later that day do not retry the skipped slot
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 12, 20)) == []
    # once the first run ended, the next slot runs
    fake.finish(first)
    assert len(tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 13, 2, 0, 1))) == 1
    assert fake.run_slots("nightly") == [utc(2026, 3, 11, 2), utc(2026, 3, 13, 2)]
    assert len(fake.redis.lrange(keys.schedule_skipped("nightly"), 0, -1)) == 1


def test_overlap_wait_holds_the_slot_until_the_previous_run_ends(fake, tmp_path):
    schedule = sched(tmp_path, overlap="wait")
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10, 12)) == []
    (first,) = tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 1))
    for minute in (1, 5, 30, 59):
        assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 12, 2, minute)) == []
        assert fake.mark("nightly") == utc(2026, 3, 11, 2)  # not handled yet
        assert not fake.redis.exists(slot_key(schedule, utc(2026, 3, 12, 2)))
    assert fake.redis.llen(keys.schedule_skipped("nightly")) == 0
    assert len(fake.runs("nightly")) == 1
    fake.finish(first)
    (second,) = tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 12, 3))
    job = fake.store.get(second)
    assert job.run["slot"] == utc(2026, 3, 12, 2).isoformat() and job.run["date"] == "2026-03-11"
    assert fake.mark("nightly") == utc(2026, 3, 12, 2)
    assert fake.redis.get(slot_key(schedule, utc(2026, 3, 12, 2))).decode() == second


def test_a_manual_run_ignores_the_overlap_policy(fake, tmp_path):
    schedule = sched(tmp_path, overlap="wait")
    first, created = start_run(fake.ctx, schedule, utc(2026, 3, 11, 2), trigger="manual")
    assert created and first.status == Status.QUEUED
    second, created = start_run(fake.ctx, schedule, utc(2026, 3, 12, 2), trigger="manual")
    assert created and second.id != first.id
    assert second.run["trigger"] == "manual"


def test_a_slot_runs_once_and_rerun_makes_a_second_job(fake, tmp_path):
    schedule = sched(tmp_path)
    slot = schedule.slot_for_date(dt.date(2026, 3, 10))
    job, created = start_run(fake.ctx, schedule, slot, trigger="manual")
    assert created and fake.sent == [job.id]
    again, created = start_run(fake.ctx, schedule, slot, trigger="manual")
    assert not created and again.id == job.id
    scheduled, created = start_run(fake.ctx, schedule, slot, trigger="schedule")
    assert not created and scheduled.id == job.id
    assert fake.sent == [job.id]
    rerun, created = start_run(fake.ctx, schedule, slot, trigger="manual", rerun=True)
    assert created and rerun.id != job.id
    assert rerun.run["slot"] == job.run["slot"] and rerun.run["date"] == "2026-03-10"
    assert fake.sent == [job.id, rerun.id]
    assert [j for j, _ in fake.runs("nightly")] == sorted([job.id, rerun.id])
    # the slot now answers with the rerun
    latest, created = start_run(fake.ctx, schedule, slot, trigger="manual")
    assert not created and latest.id == rerun.id


def test_a_tick_after_a_manual_run_of_the_same_slot_starts_nothing(fake, tmp_path):
    schedule = sched(tmp_path)
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10, 12)) == []
    manual, created = start_run(fake.ctx, schedule, utc(2026, 3, 11, 2), trigger="manual")
    assert created
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 1)) == []
    assert [j for j, _ in fake.runs("nightly")] == [manual.id]
    assert fake.mark("nightly") == utc(2026, 3, 11, 2)


def test_a_manual_run_of_a_skipped_slot_starts_it(fake, tmp_path):
    """A slot skipped because its previous run still ran has no job: running its date by hand makes one."""
    schedule = sched(tmp_path, overlap="skip")
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10, 12)) == []
    assert len(tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 1))) == 1
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 12, 2, 0, 1)) == []  # skipped
    skipped_slot = schedule.slot_for_date(dt.date(2026, 3, 11))
    assert skipped_slot == utc(2026, 3, 12, 2)
    job, created = start_run(fake.ctx, schedule, skipped_slot, trigger="manual")
    assert job is not None and created, "a manual run of a skipped date must start a run (202), not fail"
    assert job.run["date"] == "2026-03-11"


def test_a_source_outside_the_roots_starts_no_run(registry, tmp_path):
    fake = Ctx(registry, [str(tmp_path / "elsewhere")])
    schedule = sched(tmp_path)
    with pytest.raises(SourceNotAllowed):
        start_run(fake.ctx, schedule, utc(2026, 3, 11, 2), trigger="manual")
    assert fake.sent == [] and fake.runs("nightly") == []
    assert not fake.redis.exists(slot_key(schedule, utc(2026, 3, 11, 2)))  # the claim is released
    # tick logs the failure and leaves the slot to a later tick
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 10, 12)) == []
    assert tick(fake.ctx, {"nightly": schedule}, utc(2026, 3, 11, 2, 0, 1)) == []
    assert fake.mark("nightly") == utc(2026, 3, 10, 12)


def test_one_broken_schedule_does_not_stop_the_others(registry, tmp_path):
    fake = Ctx(registry, [str(tmp_path / "in")])
    good = sched(tmp_path)
    broken = parse_schedules({"schedule": [{**entry(name="broken"), "source": "/elsewhere/{date}.csv"}]})["broken"]
    schedules = {"broken": broken, "nightly": good}
    assert tick(fake.ctx, schedules, utc(2026, 3, 10, 12)) == []
    started = tick(fake.ctx, schedules, utc(2026, 3, 11, 2, 0, 1))
    assert len(started) == 1 and fake.store.get(started[0]).run["name"] == "nightly"


def test_each_schedule_has_its_own_mark(fake, tmp_path):
    a = sched(tmp_path)
    b = parse_schedules({"schedule": [{**entry(name="hourly", cron="0 * * * *", date_offset=0),
                                       "source": f"{tmp_path}/in/{{date}}.csv"}]})["hourly"]
    fake.finish_on_read = True
    both = {"nightly": a, "hourly": b}
    assert tick(fake.ctx, both, utc(2026, 3, 10, 12, 30)) == []
    started = tick(fake.ctx, both, utc(2026, 3, 11, 2, 30))
    names = sorted(fake.store.get(j).run["name"] for j in started)
    assert names == ["hourly", "nightly"]
    assert fake.mark("hourly") == utc(2026, 3, 11, 2) and fake.mark("nightly") == utc(2026, 3, 11, 2)
