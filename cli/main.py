"""The `predq` command: run the service, and use it (models, predictions, batch jobs, schedules)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click
from rich.console import Console

from cli import display
from cli.client import (
    DEFAULT_URL,
    ERROR_FORMATS,
    RESULT_FORMATS,
    STATUSES,
    ApiError,
    Client,
    ServerUnreachable,
    format_for,
)

OK = 0
API_ERROR = 1
USAGE = 2
UNREACHABLE = 3
JOB_FAILED = 4
ROW_ERRORS = 5
INTERRUPTED = 130

EXIT_CODES = f"""\b
Exit codes:
  {OK}    success; for a job: it succeeded (every row has a prediction)
  {API_ERROR}    the service refused the request (its message is printed): unknown model or job, invalid input, ...
  {USAGE}    usage error: unknown option, a local file that cannot be read or written, an output name
       without a known extension
  {UNREACHABLE}    the service (or, for `workers`, Redis) could not be reached
  {JOB_FAILED}    the job ended failed or cancelled
  {ROW_ERRORS}    the job ended partially_succeeded: some rows failed (see `predq errors JOB`); for
       `predict` with several rows: some rows have errors
  {INTERRUPTED}  interrupted (Ctrl-C); a job being waited for goes on
"""

INPUT_FORMATS = ("csv", "jsonl", "parquet")
INPUT_EXTENSIONS = ("csv", "jsonl", "ndjson", "json-lines", "parquet", "pq")  # as the service reads them
JOB_EXIT = {"succeeded": OK, "partially_succeeded": ROW_ERRORS, "failed": JOB_FAILED, "cancelled": JOB_FAILED}


@dataclass
class Target:
    """Where the API commands send requests."""

    url: str
    api_key: str | None
    _client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.api_key)
        return self._client


pass_target = click.make_pass_decorator(Target)
err = Console(stderr=True, highlight=False)


def out(line: str = "") -> None:
    click.echo(line)


def warn(line: str) -> None:
    click.echo(line, err=True)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--url", envvar="PREDQ_URL", default=DEFAULT_URL, show_default=True, show_envvar=True,
              help="Where the service answers.")
@click.option("--api-key", envvar="PREDQ_API_KEY", show_envvar=True, help="Sent as Authorization: Bearer KEY.")
@click.version_option(package_name="predq", prog_name="predq")
@click.pass_context
def predq(ctx: click.Context, url: str, api_key: str | None) -> None:
    """Predictions from scikit-learn models: run the service, and send it rows and batch jobs."""
    ctx.obj = Target(url, api_key or None)


# -- running the service ---------------------------------------------------------------------------

@predq.command()
@click.option("--port", type=int, default=None, help="Web port (default $PORT or 8000).")
@click.option("--no-demo", is_flag=True, help="Do not install the demo models into an empty MODELS_DIR.")
def up(port: int | None, no_demo: bool) -> int:
    """Start the whole service.

    The API, a worker and beat, and a Redis-compatible server when REDIS_URL is unset.
    """
    from cli import stack

    return stack.up(port=port, demo=not no_demo)


@predq.command("demo-models")
@click.option("--dir", "directory", default=None, help="Models directory (default $MODELS_DIR or ./models).")
def demo_models(directory: str | None) -> int:
    """Train and install the demo models."""
    from shared.demo import install_demo_models
    from shared.settings import get_settings

    for path in install_demo_models(directory or get_settings().MODELS_DIR):
        out(f"installed {path}")
    return OK


@predq.command("record-sha256")
@click.argument("model_file", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def record_sha256(model_file: tuple[str, ...]) -> int:
    """Record a model file's sha256 in its model.json.

    The service then refuses the file if it changes.
    """
    from shared.demo import record_sha256 as record

    for path in model_file:
        out(f"{path}: sha256 {record(path)['sha256']}")
    return OK


@predq.command("new-key")
@click.argument("name")
@click.option("--scopes", default="predict,jobs", show_default=True,
              help="Comma-separated: predict, jobs, admin (admin includes the others).")
def new_key(name: str, scopes: str) -> int:
    """Make a new random API key.

    Prints the key once, and the entry for API_KEYS_FILE.

    NAME says who the key is for; it is stored as the owner of the jobs the key creates.
    """
    from shared.auth import KeyFileError
    from shared.auth import new_key as make_key

    try:
        key, entry = make_key(name, [s.strip() for s in scopes.split(",") if s.strip()])
    except KeyFileError as e:
        warn(f"predq: {e}")
        return USAGE
    out(f"API key for {name} (shown only now; give it to its user, the service keeps only its hash):\n\n  {key}\n")
    out('Add this entry to the "keys" list of the API_KEYS_FILE, then restart the web processes:\n')
    out(f"  {json.dumps(entry)}")
    return OK


@predq.command()
def workers() -> int:
    """List the workers and whether each consumes.

    Reads REDIS_URL.

    Exit status 1 if none is consuming or one stalled, 3 if Redis does not answer.
    """
    import redis

    from shared.settings import get_settings
    from shared.workers import worker_states

    s = get_settings()
    try:
        states = worker_states(redis.Redis.from_url(s.REDIS_URL, socket_connect_timeout=2, socket_timeout=5),
                               stale_after=s.WORKER_STALE_SECONDS, heartbeat_interval=s.HEARTBEAT_INTERVAL)
    except redis.RedisError as e:
        warn(f"predq: Redis at {s.REDIS_URL} does not answer: {e}")
        return UNREACHABLE
    age = lambda a: "-" if a is None else f"{a:.1f} s"
    out(f"{'worker':40} {'status':10} {'heartbeat age':>14} {'canary age':>11}")
    for w in states:
        out(f"{w.name:40} {w.status:10} {age(w.heartbeat_age):>14} {age(w.canary_age):>11}")
    if not states:
        out("no worker has ever reported")
    consuming = any(w.status == "consuming" for w in states)
    stalled = any(w.status == "stalled" for w in states)
    return OK if consuming and not stalled else 1


# -- models and predictions ------------------------------------------------------------------------

@predq.command()
@click.option("--json", "as_json", is_flag=True, help="Print the service's JSON.")
@pass_target
def models(target: Target, as_json: bool) -> int:
    """List the deployed models.

    Each model's newest version, task, number of features and classes.
    """
    data = target.client.models()
    if as_json:
        print_json(data)
        return OK
    records = [[m["name"], m["version"], m["task"], str(len(m["features"])),
                ", ".join(map(str, m["classes"])) if m.get("classes") else "-"] for m in data]
    for line in display.table(["model", "version", "task", "features", "classes"], records):
        out(line)
    if not data:
        warn("predq: no model is deployed; put one under the service's MODELS_DIR")
    return OK


def _json_rows(text: str, source: str) -> dict | list:
    try:
        value = json.loads(text)
    except ValueError:
        # JSON Lines: one object per line
        try:
            value = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise click.BadParameter(f"not JSON or JSON Lines: {e}", param_hint=source) from None
    if not isinstance(value, (dict, list)) or isinstance(value, list) and not all(isinstance(r, dict) for r in value):
        raise click.BadParameter("give one JSON object, or an array (or lines) of objects", param_hint=source)
    return value


@predq.command()
@click.argument("model")
@click.option("--row", "row", metavar="JSON", help="One row as a JSON object: '{\"f0\": 1.5, ...}'.")
@click.option("--rows", "rows_file", type=click.File("r"), metavar="FILE",
              help="Rows from a JSON array or JSON Lines file ('-' for stdin), up to the service's SYNC_MAX_ROWS.")
@click.option("--version", "model_version", help="A model version other than the newest.")
@click.option("--probabilities", is_flag=True, help="Also the class probabilities (classifiers).")
@click.option("--json", "as_json", is_flag=True, help="Print the service's JSON.")
@pass_target
def predict(target: Target, model: str, row: str | None, rows_file: IO[str] | None, model_version: str | None,
            probabilities: bool, as_json: bool) -> int:
    """Predict for one row, or a few rows, synchronously.

    With several rows, each row has a prediction or an error; the exit status is 5 when any row has an error.
    For many rows use `predq submit`.
    """
    if (row is None) == (rows_file is None):
        raise click.UsageError("give either --row JSON or --rows FILE")
    body = _json_rows(row, "--row") if row is not None else _json_rows(rows_file.read(), "--rows")
    answer = target.client.predict(model, body, version=model_version, probabilities=probabilities)
    if as_json:
        print_json(answer)
        return ROW_ERRORS if answer.get("errors") else OK
    if "prediction" in answer:
        out(f"prediction: {answer['prediction']}")
        if answer.get("probabilities"):
            out("probabilities: " + ", ".join(f"{k} {v:.4f}" for k, v in answer["probabilities"].items()))
        return OK
    errors = {e["row"]: e for e in answer.get("errors", [])}
    probs = answer.get("probabilities") or []
    for i, value in enumerate(answer["predictions"]):
        if i in errors:
            out(f"row {i}: error {errors[i]['code']}: {errors[i]['message']}")
            continue
        shown = f"row {i}: {value}"
        if i < len(probs) and probs[i]:
            shown += "  (" + ", ".join(f"{k} {v:.4f}" for k, v in probs[i].items()) + ")"
        out(shown)
    return ROW_ERRORS if errors else OK


# -- batch jobs ------------------------------------------------------------------------------------

def _metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        metadata[key] = value
    return metadata


def _check_output(path: str | None, allowed: tuple[str, ...], option: str) -> None:
    if path is not None:
        try:
            format_for(path, allowed)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None


def _follow(target: Target, job: dict, interval: float) -> dict:
    """Wait for the job with a live progress bar (on a terminal); the terminal job."""
    with display.JobBar(err, job["id"]) as bar:
        bar(job)
        return target.client.wait(job["id"], on_progress=bar, interval=interval)


def _resume_hint(job_id: str, output: str | None) -> None:
    hint = f"predq status {job_id} --wait"
    if output:
        hint += f", then predq results {job_id} -o {output}"
    warn(f"\npredq: stopped waiting; job {job_id} goes on (it was not cancelled). Follow it with: {hint}")


def _summary(target: Target, job: dict, started: float, upload_seconds: float | None, output: str | None,
             errors_output: str | None) -> list[str]:
    """Download what was asked for, and the lines that tell how the job went and where its files are."""
    wall = time.monotonic() - started
    c = job["counts"]
    lines = [f"job {job['id']} {job['status']}: {display.counts_line(job)}"]
    if job.get("error"):
        lines.append(f"error: {job['error']['code']}: {job['error']['message']}")
    rate = f", {c['total'] / wall:,.0f} rows/s" if c["total"] else ""
    upload = "" if upload_seconds is None else f" (upload {display.duration(upload_seconds)})"
    lines.append(f"wall time: {display.duration(wall)}{upload}{rate}")
    if output:
        written = _download_to(target, job["id"], "results", output)
        lines.append(f"results: {output} ({display.rows(c['succeeded'])} rows, {display.size(written)})")
    else:
        lines.append(f"results: predq results {job['id']} -o results.parquet")
    if errors_output:
        written = _download_to(target, job["id"], "errors", errors_output)
        lines.append(f"errors: {errors_output} ({display.rows(c['failed'])} rows, {display.size(written)})")
    elif c["failed"]:
        lines.append(f"errors: {display.rows(c['failed'])} rows failed; see them with predq errors {job['id']}")
    else:
        lines.append("errors: none")
    return lines


@predq.command()
@click.argument("model")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--version", "model_version", help="A model version other than the newest.")
@click.option("--id-column", help="An input column copied into the results and errors, to match rows up.")
@click.option("--probabilities", is_flag=True, help="Add probability_<class> columns (classifiers).")
@click.option("--chunk-size", type=click.IntRange(min=1), help="Rows per chunk (default: the service's).")
@click.option("--max-error-rate", type=click.FloatRange(0, 1), help="Fail the job once more rows than this share fail.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Kept with the job (repeatable).")
@click.option("--format", "fmt", type=click.Choice(INPUT_FORMATS),
              help="The file's format, when its extension does not say (.csv, .jsonl/.ndjson, .parquet/.pq).")
@click.option("--wait", is_flag=True, help="Follow the job to its end with a progress bar, then print a summary.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the results here at the end (.parquet, .jsonl or .csv); implies --wait.")
@click.option("--errors-output", type=click.Path(dir_okay=False, writable=True),
              help="Write the row errors here at the end (.jsonl or .csv); implies --wait.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between two status requests while waiting.")
@click.option("--json", "as_json", is_flag=True, help="Print the job's JSON (the final one with --wait).")
@pass_target
def submit(target: Target, model: str, file: str, model_version: str | None, id_column: str | None,
           probabilities: bool, chunk_size: int | None, max_error_rate: float | None, metadata: tuple[str, ...],
           fmt: str | None, wait: bool, output: str | None, errors_output: str | None, interval: float,
           as_json: bool) -> int:
    """Upload a file as a batch job.

    FILE is CSV with a header row, JSON Lines or Parquet (told by its extension), predicted by MODEL. The
    file is streamed, never read into memory whole. Without --wait, prints the job's id and returns at once;
    with --wait (or --output), follows the job and exits by how it ended (see the exit codes).
    """
    filename = Path(file).name if fmt is None else f"{Path(file).stem}.{fmt}"
    if fmt is None and Path(file).suffix.lower().lstrip(".") not in INPUT_EXTENSIONS:
        raise click.BadParameter(f"cannot tell the format of {file!r} from its extension; name it .csv, .jsonl or "
                                 ".parquet, or give --format", param_hint="FILE")
    _check_output(output, RESULT_FORMATS, "--output")
    _check_output(errors_output, ERROR_FORMATS, "--errors-output")
    options: dict[str, Any] = {"chunk_size": chunk_size, "max_error_rate": max_error_rate}
    if metadata:
        options["metadata"] = _metadata(metadata)
    started = time.monotonic()
    try:
        with display.TransferBar(err, f"uploading {Path(file).name}") as bar:
            job = target.client.submit(file, model, version=model_version, id_column=id_column, filename=filename,
                                       probabilities=probabilities, on_upload=bar,
                                       options={k: v for k, v in options.items() if v is not None})
    except KeyboardInterrupt:
        warn("\npredq: upload interrupted; no job was created")
        return INTERRUPTED
    upload_seconds = time.monotonic() - started
    if not (wait or output or errors_output):
        if as_json:
            print_json(job)
        else:
            out(job["id"])
            warn(f"predq: job {job['id']} {job['status']} ({display.rows(job['counts']['total'])} rows); "
                 f"follow it with: predq status {job['id']} --wait")
        return OK
    if not as_json:
        warn(f"predq: job {job['id']} created ({display.rows(job['counts']['total'])} rows, "
             f"uploaded in {display.duration(upload_seconds)})")
    try:
        job = _follow(target, job, interval)
    except KeyboardInterrupt:
        _resume_hint(job["id"], output)
        return INTERRUPTED
    lines = _summary(target, job, started, upload_seconds, output, errors_output)
    if as_json:
        print_json(job)
    else:
        for line in lines:
            out(line)
    return JOB_EXIT[job["status"]]


@predq.command()
@click.argument("job_id", metavar="JOB")
@click.option("--wait", is_flag=True, help="Follow the job to its end; the exit status then tells how it ended.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between two status requests while waiting.")
@click.option("--json", "as_json", is_flag=True, help="Print the service's JSON.")
@pass_target
def status(target: Target, job_id: str, wait: bool, interval: float, as_json: bool) -> int:
    """Show a job's status.

    Its counts, progress, speed and time left; with --wait, a progress bar until it ends.
    """
    job = target.client.status(job_id)
    if wait:
        try:
            job = _follow(target, job, interval)
        except KeyboardInterrupt:
            _resume_hint(job_id, None)
            return INTERRUPTED
    if as_json:
        print_json(job)
    else:
        for line in display.job_report(job):
            out(line)
    return JOB_EXIT[job["status"]] if wait else OK


@predq.command()
@click.option("--status", "status_", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the service's JSON.")
@pass_target
def jobs(target: Target, status_: str | None, limit: int, as_json: bool) -> int:
    """List jobs, newest first."""
    data = target.client.jobs(status=status_, limit=limit)
    if as_json:
        print_json(data)
        return OK
    records = []
    for j in data:
        c = j["counts"]
        progress = "-" if j.get("progress") is None else f"{j['progress']:.0%}"
        records.append([j["id"], j["status"], f"{j['model']['name']} {j['model']['version']}", j["created_at"],
                        display.rows(c["total"]), display.rows(c["succeeded"]), display.rows(c["failed"]), progress])
    for line in display.table(["job", "status", "model", "created", "rows", "succeeded", "failed", "done"], records):
        out(line)
    return OK


def _fetch(target: Target, job_id: str, kind: str, output: str | None, fmt: str | None, partial: bool) -> int:
    fetch = target.client.results if kind == "results" else target.client.errors
    if output is None or output == "-":
        sys.stdout.flush()
        stdout = sys.stdout.buffer
        fetch(job_id, stdout, fmt or "jsonl", partial=partial)
        stdout.flush()
        return OK
    written = _download_to(target, job_id, kind, output, fmt, partial)
    out(f"{kind} of {job_id}: {output} ({display.size(written)})")
    return OK


def _download_to(target: Target, job_id: str, kind: str, output: str, fmt: str | None = None,
                 partial: bool = False) -> int:
    fetch = target.client.results if kind == "results" else target.client.errors
    with display.TransferBar(err, f"{kind} ->") as bar:
        return fetch(job_id, output, fmt, partial=partial, on_bytes=bar)


def _output_option(formats: tuple[str, ...]) -> Any:
    names = "/".join(f".{f}" for f in formats)
    return click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
                        help=f"Write to this file, its format from the extension ({names}); default: JSON Lines "
                             "on stdout.")


@predq.command()
@click.argument("job_id", metavar="JOB")
@_output_option(RESULT_FORMATS)
@click.option("--format", "fmt", type=click.Choice(RESULT_FORMATS), help="Format, whatever the file's name.")
@click.option("--partial", is_flag=True, help="The rows finished so far of a job that has not finished.")
@pass_target
def results(target: Target, job_id: str, output: str | None, fmt: str | None, partial: bool) -> int:
    """Download a job's results.

    One record per succeeded row, in input order: row, the id column, prediction and probability_<class>
    columns. Streamed to disk as it arrives.
    """
    if fmt is None and output not in (None, "-"):
        _check_output(output, RESULT_FORMATS, "--output")
    return _fetch(target, job_id, "results", output, fmt, partial)


@predq.command()
@click.argument("job_id", metavar="JOB")
@_output_option(ERROR_FORMATS)
@click.option("--format", "fmt", type=click.Choice(ERROR_FORMATS), help="Format, whatever the file's name.")
@click.option("--partial", is_flag=True, help="The errors found so far in a job that has not finished.")
@pass_target
def errors(target: Target, job_id: str, output: str | None, fmt: str | None, partial: bool) -> int:
    """Download a job's row errors.

    One record per failed row, in input order: row, the id column, code, message.
    """
    if fmt is None and output not in (None, "-"):
        _check_output(output, ERROR_FORMATS, "--output")
    return _fetch(target, job_id, "errors", output, fmt, partial)


@predq.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the service's JSON.")
@pass_target
def cancel(target: Target, job_id: str, as_json: bool) -> int:
    """Cancel a job.

    Chunks not yet started are skipped; the rows already finished stay downloadable.
    """
    job = target.client.cancel(job_id)
    if as_json:
        print_json(job)
    else:
        out(f"job {job_id} {job['status']}: {display.counts_line(job)}")
    return OK


@predq.command()
@click.argument("job_id", metavar="JOB")
@pass_target
def delete(target: Target, job_id: str) -> int:
    """Delete a finished job and its results now."""
    target.client.delete(job_id)
    out(f"job {job_id} deleted")
    return OK


# -- schedules -------------------------------------------------------------------------------------

@predq.command()
@pass_target
def schedules(target: Target) -> int:
    """List the schedules with their next and last runs."""
    out(f"{'schedule':24} {'cron':16} {'next run':25} last run")
    for s in target.client.schedules():
        last = s["last_run"]
        shown = f"{last['date']} {last['status']} {last['job_id']}" if last else "-"
        out(f"{s['name']:24} {s['cron']:16} {s['next_run_at']:25} {shown}")
    return OK


@predq.command("run-schedule")
@click.argument("name")
@click.option("--date", help="YYYY-MM-DD (default: the latest slot's date).")
@click.option("--rerun", is_flag=True, help="Start a new run even if the date already ran.")
@pass_target
def run_schedule(target: Target, name: str, date: str | None, rerun: bool) -> int:
    """Run a schedule for a logical date now."""
    job, created = target.client.run_schedule(name, date, rerun)
    out(f"{'started' if created else 'already ran'}: {job['id']} ({job['status']}) for {job['schedule']['date']}")
    return OK


# -- entry point -----------------------------------------------------------------------------------

def _show_api_error(e: ApiError) -> None:
    warn(f"predq: {e.message}")
    for field in e.details.get("fields", []) if isinstance(e.details.get("fields"), list) else []:
        if isinstance(field, dict):
            warn(f"  {field.get('name')}: {field.get('code')}: {field.get('message')}")


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status (see EXIT_CODES)."""
    try:
        code = predq.main(args=argv, prog_name="predq", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except ServerUnreachable as e:
        _show_api_error(e)
        return UNREACHABLE
    except ApiError as e:
        _show_api_error(e)
        return API_ERROR
    except (click.Abort, KeyboardInterrupt):
        warn("\npredq: interrupted")
        return INTERRUPTED
    except OSError as e:  # a local file that cannot be read or written
        warn(f"predq: {e.strerror or e}{f': {e.filename}' if e.filename else ''}")
        return USAGE
    return code if isinstance(code, int) else OK


if __name__ == "__main__":
    sys.exit(main())
