"""Single-prediction benchmark: predq next to the peer servers of /work/shared/bench-peers, in one run.

    .venv/bin/python bench/sync.py [--cache] [--direct] [--fast-path-off] [--peers "flask bento mlflow1"]
                                   [--duration 10] [--rotate] [--env NAME=VALUE ...] [--keep]

The peers' model (`$MODEL_DIR/logreg.joblib`, made by the peers' setup.sh) is deployed into a temporary MODELS_DIR as
predq model `logreg` (a model.json naming its 20 features, with the file's sha256 recorded), a private
Redis-compatible server is started (never the shared one on 6379), and the peers' `run_all.sh` is run with predq
added as a `--target`: the Procfile's `web` line, started and stopped by run_all.sh, POSTing the peers' flat
record to `/v1/models/logreg/predict`. With --cache a second predq target runs with PREDICTION_CACHE_SIZE set;
with --fast-path-off another one runs with PREDICT_FAST_PATH=off (every request through Flask).
The prediction cache is off for the first target whatever the environment says. run_all.sh prints the table.

See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `python bench/sync.py`
    sys.path.insert(0, str(REPO_ROOT))

import joblib

from cli.stack import procfile
from shared.demo import record_sha256
from shared.registry import MODEL_FILE
from tests.support.processes import RedisServer, free_port

PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/work/shared/bench-peers"))
MODEL_DIR = Path(os.environ.get("MODEL_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "predq-peers")))
MODEL_NAME = "logreg"
DIRECT_MODEL_NAME = "logreg_direct"  # the same file, with "direct_predict": true in its model.json
CACHE_SIZE = 10_000  # as many entries as ROTATE=1 has distinct rows


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def deploy(models_dir: Path, name: str = "logreg", direct: bool = False) -> None:
    """The peers' logreg pipeline as predq model `name`, version v1, with its features and sha256 recorded
    (and `"direct_predict": true` in its model.json with `direct`)."""
    source = MODEL_DIR / "logreg.joblib"
    if not source.exists():
        raise SystemExit(f"{source} is missing: run {PEERS_DIR}/setup.sh first")
    target = models_dir / name / "v1"
    target.mkdir(parents=True)
    shutil.copyfile(source, target / MODEL_FILE)
    names = [str(n) for n in joblib.load(source).feature_names_in_]
    meta = {"features": [{"name": n, "dtype": "float64"} for n in names], "allows_missing": False}
    if direct:
        meta["direct_predict"] = True
    (target / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    record_sha256(target / MODEL_FILE)


def start_command(port: int, redis_url: str, models_dir: Path, env: dict[str, str]) -> str:
    """The Procfile's web line as run_all.sh's --start (bash -c, in its own process group)."""
    variables = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "HOST": "127.0.0.1",
                 "PORT": str(port), "REDIS_URL": redis_url, "MODELS_DIR": str(models_dir), "LOG_LEVEL": "WARNING",
                 **env}
    exports = " ".join(f"{k}={_quote(v)}" for k, v in variables.items())
    return f"cd {_quote(str(REPO_ROOT))} && export {exports} && {procfile(REPO_ROOT / 'Procfile')['web']}"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", action="store_true", help=f"add a target with PREDICTION_CACHE_SIZE={CACHE_SIZE}")
    parser.add_argument("--peers", default="flask bento mlflow1",
                        help='peers of run_all.sh, in order (default "flask bento mlflow1"; "" for none)')
    parser.add_argument("--duration", type=int, default=10, help="seconds of each load phase (default 10)")
    parser.add_argument("--direct", action="store_true",
                        help='add a target whose model has "direct_predict": true in its model.json (cache off)')
    parser.add_argument("--fast-path-off", action="store_true",
                        help="add a target with PREDICT_FAST_PATH=off (single predictions through Flask)")
    parser.add_argument("--rotate", action="store_true", help="ROTATE=1: 10,000 distinct rows in turn")
    parser.add_argument("--no-limits", action="store_true", help="skip the in-process limits")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the predq targets, e.g. WEB_THREADS=8 (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (models, results, logs)")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="predq-bench-sync-"))
    log(f"working directory {tmp}")
    (tmp / "redis").mkdir()
    redis = RedisServer(dir=str(tmp / "redis"))
    run_all: subprocess.Popen | None = None
    try:
        models_dir = tmp / "models"
        deploy(models_dir)
        deploy(models_dir, DIRECT_MODEL_NAME, direct=True)
        redis.start()
        body = MODEL_DIR / ("bodies_record.jsonl" if args.rotate else "body_record.json")
        targets = [("predq: gunicorn gthread, micro-batching, cache off", MODEL_NAME,
                    {**extra, "PREDICTION_CACHE_SIZE": "0"})]
        if args.fast_path_off:
            targets.append(("predq: same, PREDICT_FAST_PATH=off", MODEL_NAME,
                            {**extra, "PREDICTION_CACHE_SIZE": "0", "PREDICT_FAST_PATH": "off"}))
        if args.direct:
            targets.append(('predq: same, model.json "direct_predict": true', DIRECT_MODEL_NAME,
                            {**extra, "PREDICTION_CACHE_SIZE": "0"}))
        if args.cache:
            targets.append((f"predq: same, PREDICTION_CACHE_SIZE={CACHE_SIZE}", MODEL_NAME,
                            {**extra, "PREDICTION_CACHE_SIZE": str(CACHE_SIZE)}))
        command = [str(PEERS_DIR / "run_all.sh")]
        if not args.peers.strip():
            command.append("--no-peers")
        if args.no_limits:
            command.append("--no-limits")
        for name, model, env in targets:
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1/models/{model}/predict"
            command += ["--target", name, url, str(body), "--start", start_command(port, redis.url, models_dir, env)]
        run_env = {**os.environ, "PEERS": args.peers, "DURATION": str(args.duration), "OUT": str(tmp / "results"),
                   "ROTATE": "1" if args.rotate else "0", "MODEL_DIR": str(MODEL_DIR)}
        log(f"run_all.sh with {len(targets)} predq target(s); peers: {args.peers or 'none'}; "
            f"extra environment: {extra or 'none'}")
        run_all = subprocess.Popen(command, env=run_env)
        return run_all.wait()
    except KeyboardInterrupt:
        log("interrupted")
        if run_all is not None and run_all.poll() is None:
            run_all.send_signal(signal.SIGTERM)  # its trap stops the server it started
            run_all.wait(timeout=120)
        return 130
    finally:
        redis.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
