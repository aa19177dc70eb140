"""/readyz also answers for what jobs need beyond Redis: a broker set apart, and a chunk store when one is set."""
from __future__ import annotations

import pytest

from api import create_app
from tests.support.processes import free_port

pytestmark = pytest.mark.integration


def ready(settings_env: dict, **settings) -> tuple[int, dict]:
    answer = create_app({**settings_env, **settings}).test_client().get("/readyz")
    return answer.status_code, answer.json


def test_a_reachable_chunk_store_and_broker_are_checked_and_ready(settings_env, redis_server, tmp_path):
    status, body = ready(settings_env, CHUNK_STORE_URL=f"file://{tmp_path}/store",
                         CELERY_BROKER_URL=redis_server.url.replace("/0", "/1"))  # apart from the state's URL
    assert status == 200, body
    assert body["checks"]["chunk_store"] == {"ok": True} and body["checks"]["broker"] == {"ok": True}
    assert list((tmp_path / "store" / ".predq-ready").iterdir())  # the probe object was written


def test_without_a_broker_or_store_apart_there_is_nothing_more_to_check(settings_env):
    status, body = ready(settings_env)
    assert status == 200 and "broker" not in body["checks"] and "chunk_store" not in body["checks"]


def test_a_chunk_store_that_cannot_be_written_makes_the_process_not_ready(settings_env, tmp_path):
    (tmp_path / "not-a-directory").write_text("a file where the store's folder should be")
    status, body = ready(settings_env, CHUNK_STORE_URL=f"file://{tmp_path}/not-a-directory")
    assert status == 503 and body["status"] == "not_ready"
    check = body["checks"]["chunk_store"]
    assert check["ok"] is False and "not-a-directory" in check["message"] and "writing" in check["message"]


def test_a_broker_that_does_not_answer_makes_the_process_not_ready(settings_env):
    status, body = ready(settings_env, CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert status == 503 and body["checks"]["broker"]["ok"] is False
    assert "does not answer" in body["checks"]["broker"]["message"]
    assert body["checks"]["redis"] == {"ok": True}  # the state Redis is fine: the message says which part is not
