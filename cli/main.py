"""The `predq` command."""
from __future__ import annotations

import argparse
import sys

from cli import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predq", description="Predictions from scikit-learn models.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the API, a worker and beat (and a Redis-compatible server when REDIS_URL is unset)")
    up.add_argument("--port", type=int, default=None, help="web port (default $PORT or 8000)")
    up.add_argument("--no-demo", action="store_true", help="do not install the demo models into an empty MODELS_DIR")

    demo = sub.add_parser("demo-models", help="train and install the demo models")
    demo.add_argument("--dir", default=None, help="models directory (default $MODELS_DIR or ./models)")

    sha = sub.add_parser("record-sha256", help="record a model file's sha256 in its model.json, so a changed file is refused")
    sha.add_argument("model_file", nargs="+")

    key = sub.add_parser("new-key", help="make a new random API key: prints it once, and the entry for API_KEYS_FILE")
    key.add_argument("name", help="the key's name: who it is for (stored as the owner of the jobs it creates)")
    key.add_argument("--scopes", default="predict,jobs",
                     help="comma-separated: predict, jobs, admin (default predict,jobs; admin includes the others)")

    sub.add_parser("workers", help="list the workers and whether each is consuming; exit 1 if none is, or one stalled")

    sub.add_parser("schedules", help="list the schedules with their next and last runs ($PREDQ_URL)")
    run = sub.add_parser("run-schedule", help="run a schedule for a logical date now ($PREDQ_URL)")
    run.add_argument("name")
    run.add_argument("--date", help="YYYY-MM-DD (default: the latest slot's date)")
    run.add_argument("--rerun", action="store_true", help="start a new run even if the date already ran")

    args = parser.parse_args(argv)
    if args.command in ("schedules", "run-schedule"):
        return _api_command(args)
    if args.command == "workers":
        return workers_report()
    if args.command == "new-key":
        return new_key(args.name, args.scopes)
    if args.command == "up":
        return stack.up(port=args.port, demo=not args.no_demo)
    if args.command == "demo-models":
        from shared.demo import install_demo_models
        from shared.settings import get_settings

        for path in install_demo_models(args.dir or get_settings().MODELS_DIR):
            print(f"installed {path}")
        return 0
    if args.command == "record-sha256":
        from shared.demo import record_sha256

        for path in args.model_file:
            print(f"{path}: sha256 {record_sha256(path)['sha256']}")
        return 0
    return 2


def _api_command(args: argparse.Namespace) -> int:
    from cli.client import ApiError, Client

    client = Client()
    try:
        if args.command == "schedules":
            rows = client.schedules()
            print(f"{'schedule':24} {'cron':16} {'next run':25} last run")
            for s in rows:
                last = s["last_run"]
                shown = f"{last['date']} {last['status']} {last['job_id']}" if last else "-"
                print(f"{s['name']:24} {s['cron']:16} {s['next_run_at']:25} {shown}")
            return 0
        job, created = client.run_schedule(args.name, args.date, args.rerun)
        print(f"{'started' if created else 'already ran'}: {job['id']} ({job['status']}) for "
              f"{job['schedule']['date']}")
        return 0
    except ApiError as e:
        print(f"predq: {e.message}", file=sys.stderr)
        return 1


def new_key(name: str, scopes: str) -> int:
    """Print a new key (only its sha256 is stored by the service) and the line to add to the key file."""
    import json

    from shared.auth import KeyFileError
    from shared.auth import new_key as make_key

    try:
        key, entry = make_key(name, [s.strip() for s in scopes.split(",") if s.strip()])
    except KeyFileError as e:
        print(f"predq: {e}", file=sys.stderr)
        return 2
    print(f"API key for {name} (shown only now; give it to its user, the service keeps only its hash):\n\n  {key}\n")
    print('Add this entry to the "keys" list of the API_KEYS_FILE, then restart the web processes:\n')
    print(f"  {json.dumps(entry)}")
    return 0


def workers_report() -> int:
    """Print each worker's state; the exit status says whether the workers can be relied on."""
    import redis

    from shared.settings import get_settings
    from shared.workers import worker_states

    s = get_settings()
    try:
        states = worker_states(redis.Redis.from_url(s.REDIS_URL, socket_connect_timeout=2, socket_timeout=5),
                               stale_after=s.WORKER_STALE_SECONDS, heartbeat_interval=s.HEARTBEAT_INTERVAL)
    except redis.RedisError as e:
        print(f"Redis at {s.REDIS_URL} does not answer: {e}", file=sys.stderr)
        return 2
    print(f"{'worker':40} {'status':10} {'heartbeat age':>14} {'canary age':>11}")
    for w in states:
        fmt = lambda a: "-" if a is None else f"{a:.1f} s"  # noqa: E731
        print(f"{w.name:40} {w.status:10} {fmt(w.heartbeat_age):>14} {fmt(w.canary_age):>11}")
    if not states:
        print("no worker has ever reported")
    consuming = any(w.status == "consuming" for w in states)
    stalled = any(w.status == "stalled" for w in states)
    return 0 if consuming and not stalled else 1


if __name__ == "__main__":
    sys.exit(main())
