"""What the `predq` command shows: progress bars on a terminal (stderr), tables and summaries (stdout)."""
from __future__ import annotations

from datetime import datetime
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_UPDATE_EVERY = 1 << 20  # bytes between two redraws of a transfer bar


def rows(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s"


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def job_seconds(job: dict) -> float | None:
    """Seconds from the job's creation to its end (or None while it runs)."""
    created, finished = _time(job.get("created_at")), _time(job.get("finished_at"))
    return (finished - created).total_seconds() if created and finished else None


def counts_line(job: dict) -> str:
    c = job["counts"]
    return (f"{rows(c['total'])} rows: {rows(c['succeeded'])} succeeded, {rows(c['failed'])} failed, "
            f"{rows(c['skipped'])} skipped")


def job_report(job: dict) -> list[str]:
    """`predq status`: the job as aligned lines."""
    progress = job.get("progress")
    speed = job.get("rows_per_second")
    lines = [
        ("job", job["id"]),
        ("status", job["status"]),
        ("model", f"{job['model']['name']} {job['model']['version']}"),
        ("rows", counts_line(job) + ("" if progress is None else f" ({progress:.1%} done)")),
        ("speed", "-" if not speed else f"{speed:,.0f} rows/s"
         + ("" if job["status"] not in ("queued", "running") or job.get("eta_seconds") is None
            else f", about {duration(job['eta_seconds'])} left")),
        ("created", job.get("created_at") or "-"),
        ("started", job.get("started_at") or "-"),
        ("finished", job.get("finished_at") or "-"),
    ]
    if job.get("schedule"):
        lines.append(("schedule", f"{job['schedule']['name']} for {job['schedule']['date']}"))
    if job.get("metadata"):
        lines.append(("metadata", ", ".join(f"{k}={v}" for k, v in job["metadata"].items())))
    if job.get("error"):
        lines.append(("error", f"{job['error']['code']}: {job['error']['message']}"))
    return [f"{name:9} {value}" for name, value in lines]


def table(headers: list[str], records: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in records)) if records else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [fmt(headers), *(fmt(r) for r in records)]


class _Bar:
    """A rich progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, console: Console, *columns: object):
        self.progress = Progress(*columns, console=console, transient=False) if console.is_terminal else None
        self.task: TaskID | None = None

    def __enter__(self) -> Self:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()


class TransferBar(_Bar):
    """Bytes sent or received, with speed and time left."""

    def __init__(self, console: Console, label: str):
        super().__init__(console, TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                         TimeRemainingColumn())
        self._shown = -_UPDATE_EVERY
        self._done = 0
        self._total: int | None = None
        if self.progress is not None:
            self.task = self.progress.add_task(label, total=None)

    def __call__(self, done: int, total: int | None = None) -> None:
        self._done, self._total = done, total
        if self.progress is None or self.task is None:
            return
        if done - self._shown >= _UPDATE_EVERY or done == total:
            self._shown = done
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None and self.progress is not None and self.task is not None:
            # the last blocks, and the length of a download, are known only now
            self.progress.update(self.task, completed=self._done, total=self._total or self._done)
        super().__exit__(kind, exc, tb)


class JobBar(_Bar):
    """Rows done of total, the service's rows per second and its estimate of the time left."""

    def __init__(self, console: Console, job_id: str):
        super().__init__(console, TextColumn("[bold]{task.description}"), BarColumn(),
                         TextColumn("{task.fields[rows]}"), TextColumn("{task.fields[speed]}"),
                         TextColumn("{task.fields[eta]}"), TimeElapsedColumn())
        if self.progress is not None:
            self.task = self.progress.add_task(job_id, total=None, rows="", speed="", eta="")

    def __call__(self, job: dict) -> None:
        if self.progress is None or self.task is None:
            return
        c = job["counts"]
        done = c["succeeded"] + c["failed"] + c["skipped"]
        speed = job.get("rows_per_second")
        eta = job.get("eta_seconds")
        self.progress.update(
            self.task, completed=done, total=c["total"], description=f"{job['id']} {job['status']}",
            rows=f"{rows(done)}/{rows(c['total'])} rows" + (f" ({c['failed']:,} failed)" if c["failed"] else ""),
            speed=f"{speed:,.0f} rows/s" if speed else "",
            eta=f"ETA {duration(eta)}" if eta is not None and job["status"] in ("queued", "running") else "")
