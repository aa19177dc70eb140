"""What depends on the broker's kind: transport options, a worker's own queue, the settings it accepts."""
from __future__ import annotations

import math

import pytest

from shared import broker
from shared.dispatch import make_celery
from shared.settings import load_settings

RABBIT = "amqp://predq:secret@rabbit.internal:5672/predq"


@pytest.mark.parametrize(("url", "expected"), [("redis://127.0.0.1:6379/0", "redis"), ("rediss://r:6380/1", "redis"),
                                               (RABBIT, "amqp"), ("pyamqp://guest@localhost//", "amqp")])
def test_broker_kind_follows_the_url_scheme(url, expected):
    """redis:// and rediss:// are Redis brokers; amqp:// and pyamqp:// are RabbitMQ."""
    assert broker.kind(url) == expected


def test_an_unknown_broker_scheme_stops_the_process_at_start():
    """A CELERY_BROKER_URL no transport here speaks is refused when settings load, naming the scheme."""
    with pytest.raises(ValueError, match="unsupported broker URL scheme 'sqs'"):
        load_settings({"CELERY_BROKER_URL": "sqs://key:secret@"})


def test_redis_options_only_on_a_redis_broker():
    """Visibility timeout and the unacked sweep go to Redis; RabbitMQ gets publisher confirms instead."""
    on_redis = make_celery(load_settings({"VISIBILITY_TIMEOUT": 700, "UNACKED_RESTORE_INTERVAL": 30}))
    assert on_redis.conf.broker_transport_options == {"visibility_timeout": 700, "unacked_restore_interval": 30,
                                                      "unacked_restore_throttle": 1}
    on_rabbit = make_celery(load_settings({"CELERY_BROKER_URL": RABBIT}))
    assert on_rabbit.conf.broker_transport_options == {"confirm_publish": True}
    assert on_rabbit.conf.broker_url == RABBIT
    assert on_rabbit.conf.redbeat_redis_url == load_settings().REDIS_URL  # beat's state stays in REDIS_URL


def test_rabbitmq_settings_warn_of_its_consumer_timeout():
    """On RabbitMQ a task holding a delivery past consumer_timeout is cut short: the warning names the setting;
    the Redis-only visibility timeout warning is not given."""
    settings = load_settings({"CELERY_BROKER_URL": RABBIT, "VISIBILITY_TIMEOUT": 10})
    (warning,) = settings.warnings()
    assert "consumer_timeout" in warning and "3630" in warning
    assert load_settings({"CELERY_BROKER_URL": RABBIT, "SOURCE_READ_TIME_LIMIT": 1200}).warnings() == []


def test_a_workers_own_queue_expires():
    """A worker's own queue is bound by its name, and the broker removes it an hour after its worker left."""
    queue = broker.own_queue("predq.worker.w1@host")
    assert queue.name == queue.routing_key == queue.exchange.name == "predq.worker.w1@host"
    assert queue.expires == 3600


def test_queue_length_is_unknown_when_the_broker_does_not_answer():
    """NaN, not 0, when the broker is down: an autoscaler must not read it as an empty queue."""
    app = make_celery(load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert math.isnan(broker.queue_length(app, "predq.chunks"))
