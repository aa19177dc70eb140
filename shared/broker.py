"""The broker that carries task messages: Redis (the state Redis by default, or another server) or RabbitMQ.

Everything that differs between the two lives here. Job state never does: it is always in REDIS_URL, and the
window of chunks in flight, the reconciler and cancel all count from there, whatever the broker holds.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # settings import this module: kombu and celery load only where a broker is used
    from celery import Celery
    from kombu import Queue

REDIS_SCHEMES = frozenset({"redis", "rediss", "sentinel"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

#: A worker's own queue (its canaries) is deleted by the broker once unused this long (x-expires; RabbitMQ, and
#: kombu's Redis transport too), so the queues of workers that are gone do not pile up.
OWN_QUEUE_EXPIRES = 3600.0


def kind(url: str) -> str:
    """'redis' or 'amqp' for a broker URL; ValueError names any other scheme."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    raise ValueError(f"unsupported broker URL scheme {scheme!r}: use redis://, rediss:// or amqp://")


def transport_options(url: str, *, visibility_timeout: float, unacked_restore_interval: float) -> dict:
    """Transport options for the broker at `url`.

    Redis has no acknowledgements of its own: kombu keeps unacked messages in a hash and puts them back after
    `visibility_timeout`. RabbitMQ redelivers an unacked message as soon as its consumer's channel closes,
    and needs publisher confirms for a sent message to be known stored.
    """
    if kind(url) == "redis":
        return {"visibility_timeout": visibility_timeout, "unacked_restore_interval": unacked_restore_interval,
                "unacked_restore_throttle": 1}
    return {"confirm_publish": True}


def own_queue(name: str) -> Queue:
    """A worker's own queue (its canaries), which goes away an hour after it was last used."""
    from kombu import Exchange, Queue

    return Queue(name, Exchange(name), routing_key=name, expires=OWN_QUEUE_EXPIRES)


def queue_length(app: Celery, name: str) -> float:
    """Messages waiting in the queue `name` of the app's broker; 0 if it was never declared; NaN if the broker
    does not answer (Prometheus reads NaN as unknown, where 0 would tell an autoscaler to scale in)."""
    from kombu.exceptions import OperationalError

    with app.connection_for_read() as conn:
        try:
            conn.ensure_connection(max_retries=0)  # one try: a scrape that waits helps no one, the next one asks again
            with conn.channel() as channel:
                try:
                    return channel.queue_declare(queue=name, passive=True).message_count
                except conn.channel_errors:
                    return 0  # never declared; on Redis, an empty queue has no key at all
        except (OperationalError, *conn.connection_errors):
            return math.nan


def unreachable(app: Celery) -> str | None:
    """Why the app's broker cannot be reached now (one try, the transport's connect timeout), or None."""
    from kombu.exceptions import OperationalError

    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=0)
        except (OperationalError, *conn.connection_errors) as e:
            return f"the broker at {conn.as_uri()} does not answer: {type(e).__name__}"
    return None


def delete_queue(app: Celery, name: str) -> None:
    """Delete a queue of the app's broker, with whatever messages are still in it."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        with conn.channel() as channel:
            channel.queue_delete(queue=name)
