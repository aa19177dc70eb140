"""Fixtures for integration tests: real Redis-compatible server, Celery workers, API.

Redis isolation
---------------
One server is started for the whole session (``redis_server``) on a free port
in its own temp dir -- never the shared Redis on 127.0.0.1:6379. Tests share
it and DB 0 (Celery broker, results and our own keys all live there).
Tests that need an empty Redis request ``clean_redis``, which FLUSHALLs
*that test server* (after checking it really is ours) before the test. It is
not autouse: a test that does not ask for it may see keys left by earlier
tests. Tests that kill or restart Redis must start their own
``RedisServer`` rather than touch the session one.

Logs of the processes started here are written under pytest's temporary
directory (kept for the last few runs) so they can be inspected after a
failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

_HERE = Path(__file__).resolve().parent
_REPO_ROOT = str(_HERE.parents[1])
if _REPO_ROOT not in sys.path:  # for `tests.support`, `api`, `shared`
    sys.path.insert(0, _REPO_ROOT)

from tests.support.processes import FORBIDDEN_PORTS, ApiServer, CeleryWorker, RedisServer  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: test runs against real Redis / Celery / gunicorn processes"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path)).resolve()
        if path == _HERE or _HERE in path.parents:
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis-compatible server for the whole session (own port, own dir)."""
    server = RedisServer(dir=str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _test_process_points_at_test_redis(redis_server: RedisServer) -> Iterator[None]:
    """Point this (pytest) process's environment at the session test server.

    The application's settings default to 127.0.0.1:6379, the shared Redis;
    any code path in the test process that reads settings from the
    environment must land on our server instead.
    """
    patch = pytest.MonkeyPatch()
    patch.setenv("REDIS_URL", redis_server.url)
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BROKER_URL"):
        patch.delenv(name, raising=False)
    _clear_settings_cache()
    try:
        yield
    finally:
        patch.undo()
        _clear_settings_cache()


def _clear_settings_cache() -> None:
    try:
        from shared.settings import get_settings
    except ImportError:
        return
    cache_clear = getattr(get_settings, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL (DB 0) of the session test server."""
    return redis_server.url


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    """Empty the session test server (FLUSHALL) before the test; returns it.

    Only ever the server this session started: the port and the server's own
    process id are checked before flushing.
    """
    assert redis_server.port not in FORBIDDEN_PORTS
    client = redis_server.client()
    try:
        info = client.info("server")
        assert int(info["process_id"]) == redis_server.pid, "not our Redis server"
        client.flushall()
    finally:
        client.close()
    return redis_server


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A temp models directory with the demo models and the test models installed."""
    from shared.demo import install_demo_models
    from tests.support.models import install_test_models

    path = tmp_path_factory.mktemp("models")
    install_demo_models(path)
    install_test_models(path)
    return str(path)


# --------------------------------------------------------------------------
# Celery workers
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def worker(
    redis_server: RedisServer, models_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    """One Celery worker (prefork, concurrency 2) for the whole session."""
    proc = CeleryWorker(
        redis_server.url,
        models_dir=models_dir,
        concurrency=2,
        name="predq-session",
        log_dir=str(tmp_path_factory.mktemp("worker-session")),
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def worker_factory(
    redis_server: RedisServer, models_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., CeleryWorker]]:
    """Create extra Celery workers; all are stopped at the end of the test.

    ``worker_factory(env={...}, concurrency=..., queues=..., start=True,
    wait_ready=True, redis_url=..., models_dir=...)`` returns the worker,
    started (and ready) unless told otherwise. ``redis_url`` and
    ``models_dir`` default to the session ones; the remaining keyword
    arguments go to :class:`CeleryWorker`. Note that when the session
    ``worker`` is also running against the same server it consumes from the
    same default queue; pass ``queues=`` (or a separate ``RedisServer``) when
    a test needs its tasks to land on a specific worker.
    """
    created: list[CeleryWorker] = []
    session_models_dir = models_dir

    def factory(
        *,
        env: dict[str, str] | None = None,
        redis_url: str | None = None,
        models_dir: str | None = None,
        start: bool = True,
        wait_ready: bool = True,
        **kwargs,
    ) -> CeleryWorker:
        kwargs.setdefault("log_dir", str(tmp_path_factory.mktemp("worker")))
        proc = CeleryWorker(
            redis_url or redis_server.url,
            models_dir=models_dir or session_models_dir,
            env=env,
            **kwargs,
        )
        created.append(proc)
        if start:
            proc.start(wait_ready=wait_ready)
        return proc

    try:
        yield factory
    finally:
        errors = []
        for proc in reversed(created):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def api_server(
    redis_server: RedisServer, models_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    """gunicorn serving the real app against the session Redis."""
    proc = ApiServer(
        redis_server.url,
        models_dir=models_dir,
        log_dir=str(tmp_path_factory.mktemp("api")),
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def settings_env(redis_server: RedisServer, models_dir: str) -> dict[str, str]:
    """Settings for building the app in-process: ``create_app(settings_env)``."""
    return {"REDIS_URL": redis_server.url, "MODELS_DIR": models_dir}


@pytest.fixture(scope="session")
def app(settings_env: dict[str, str]):
    """The Flask app built in-process against the session Redis."""
    from api import create_app

    return create_app(dict(settings_env))


@pytest.fixture
def client(app):
    """A Flask test client for ``app``."""
    return app.test_client()
