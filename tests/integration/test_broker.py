"""A broker other than the state Redis (CELERY_BROKER_URL): a second Redis server, or RabbitMQ."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kombu import Connection

from api import create_app
from shared.registry import Registry
from tests.integration.test_batch_jobs import assert_job_matches, submit, wait_terminal
from tests.support import data
from tests.support.processes import CeleryWorker, RedisServer, wait_for

RABBITMQ = "127.0.0.1:5672"
N_ROWS = 12_000
CHUNK_ROWS = 1500  # 8 chunks, 2 at a time in the broker: most are sent by the worker as earlier ones commit
FAST = {"HEARTBEAT_INTERVAL": "0.5", "WORKER_STALE_SECONDS": "5", "JOB_QUEUE_WINDOW": "2"}


@dataclass
class Stack:
    state: RedisServer
    settings: dict[str, str]
    models_dir: str
    log_dir: str

    def client(self):
        return create_app({"REDIS_URL": self.state.url, "MODELS_DIR": self.models_dir, **self.settings}).test_client()

    def worker(self) -> CeleryWorker:
        return CeleryWorker(self.state.url, models_dir=self.models_dir, env=self.settings, concurrency=2,
                            queues=self.settings.get("CHUNK_QUEUE", "predq.chunks"), log_dir=self.log_dir)


def queue_length_metric(client) -> float:
    match = re.search(r"^predq_queue_length (\S+)$", client.get("/metrics").data.decode(), re.MULTILINE)
    return float(match.group(1))


def run_job_through_the_broker(stack: Stack) -> str:
    """A job waits in the broker until a worker starts, then finishes exactly; returns the worker's name."""
    client = stack.client()
    planted = data.planted_csv(N_ROWS)
    created = submit(client, planted, model="fussy", id_column="id", probabilities=True, chunk_size=CHUNK_ROWS)
    # The window's two chunk messages wait in the broker, and /metrics counts them there.
    wait_for(lambda: queue_length_metric(client) == 2, timeout=30, what="2 chunk messages in the broker")
    with stack.worker():
        ready = wait_for(lambda: client.get("/readyz?workers=true").status_code == 200 and client.get("/readyz"),
                         timeout=60, what="the worker's canary, sent through the broker, to run")
        (state,) = ready.json["checks"]["workers"]["workers"]
        job = wait_terminal(client, created["id"], timeout=120)
        assert_job_matches(client, job, planted, Registry(stack.models_dir).get("fussy"))
        assert queue_length_metric(client) == 0
    return state["name"]


def assert_state_holds_no_broker_keys(state: RedisServer) -> None:
    """Every key in the state Redis is one of predq's own: no queue, binding or unacked message of the broker."""
    names = sorted(k.decode() for k in state.client().keys("*"))
    assert names and all(name.startswith("predq:") for name in names), names


@pytest.fixture
def state_redis(tmp_path) -> Iterator[RedisServer]:
    with RedisServer(dir=str(tmp_path / "state")) as server:
        yield server


def test_broker_on_a_second_redis(state_redis, models_dir, tmp_path):
    """Chunk messages and canaries go through a second Redis; the job finishes exactly; the state Redis has no
    trace of the broker."""
    with RedisServer(dir=str(tmp_path / "broker")) as broker:
        stack = Stack(state_redis, {**FAST, "CELERY_BROKER_URL": broker.url}, models_dir, str(tmp_path / "worker"))
        worker_name = run_job_through_the_broker(stack)
        assert_state_holds_no_broker_keys(state_redis)
        broker_keys = {k.decode() for k in broker.client().keys("*")}
        assert {"_kombu.binding.predq.chunks", f"_kombu.binding.predq.worker.{worker_name}"} <= broker_keys
        assert not any(k.startswith("predq:") for k in broker_keys), broker_keys


# -- RabbitMQ ---------------------------------------------------------------------------------------------------

def _rabbitmq_reachable() -> bool:
    try:
        with Connection(f"amqp://guest:guest@{RABBITMQ}//", connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not here
        return False


def _rabbitmqctl(*args: str) -> bool:
    try:
        return subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class RabbitPlace:
    url: str
    chunk_queue: str
    vhost: str | None  # None: the default vhost, with queue names of this test's own


@pytest.fixture
def rabbitmq() -> Iterator[RabbitPlace]:
    """A vhost of this test's own (deleted afterwards), or else queue names of its own in the default vhost."""
    if not _rabbitmq_reachable():
        pytest.skip(f"RabbitMQ not reachable at {RABBITMQ}; broker test skipped")
    tag = uuid.uuid4().hex[:10]
    vhost = f"predq-test-{tag}"
    can_make_vhost = os.geteuid() == 0 and shutil.which("rabbitmqctl") and _rabbitmqctl("add_vhost", vhost)
    if can_make_vhost:
        try:
            assert _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"), "vhost permissions"
            yield RabbitPlace(f"amqp://guest:guest@{RABBITMQ}/{vhost}", "predq.chunks", vhost)
        finally:
            _rabbitmqctl("delete_vhost", vhost)
        return
    place = RabbitPlace(f"amqp://guest:guest@{RABBITMQ}//", f"predq.test.{tag}.chunks", None)
    try:
        yield place
    finally:
        with Connection(place.url, connect_timeout=5) as conn:
            conn.default_channel.queue_delete(place.chunk_queue)  # only the queue this test named


def _queue_exists(url: str, name: str) -> bool:
    with Connection(url, connect_timeout=5) as conn:
        try:
            conn.default_channel.queue_declare(queue=name, passive=True)
            return True
        except conn.channel_errors:
            return False


def test_broker_on_rabbitmq(rabbitmq, state_redis, models_dir, tmp_path):
    """Over RabbitMQ (amqp://): a job finishes exactly, canaries prove the worker consumes, the queue length comes
    from RabbitMQ, and the state Redis holds job state only."""
    settings = {**FAST, "CELERY_BROKER_URL": rabbitmq.url, "CHUNK_QUEUE": rabbitmq.chunk_queue}
    stack = Stack(state_redis, settings, models_dir, str(tmp_path / "worker"))
    worker_name = run_job_through_the_broker(stack)
    assert_state_holds_no_broker_keys(state_redis)
    assert _queue_exists(rabbitmq.url, rabbitmq.chunk_queue)
    assert not _queue_exists(rabbitmq.url, f"predq.worker.{worker_name}")  # deleted when its worker stopped
