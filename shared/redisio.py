"""Redis clients: replies parsed by hiredis, commands packed by redis-py.

A worker reads each chunk's input, megabytes, in one reply: hiredis parses it about nine times faster than
redis-py's own parser (36 against 320 ms for forty 4 MiB replies). But hiredis's command packer copies every
argument into one new string, a large one slowly (200 ms for forty 4 MiB values, against 4 ms for the copy alone),
where redis-py's packer sends a large value as it is. So every client takes its packer from redis-py.
"""
from __future__ import annotations

from typing import Any

import redis
from redis.connection import Encoder, PythonRespSerializer

#: redis-py's packer, as a connection builds it without hiredis (6000: its cut-off for sending a value apart).
_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client of the server at `url` (options as for redis.Redis.from_url)."""
    return redis.Redis.from_url(url, command_packer=_PACKER, **kwargs)
