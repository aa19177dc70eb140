"""Structured JSON logs, one object per line, with the job id and chunk when there is one."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_context: ContextVar[dict[str, Any] | None] = ContextVar("predq_log_context", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add these fields to every line logged inside the block (by this thread), e.g. the job id and chunk."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def add_log_context(**fields: Any) -> None:
    """Add fields to the enclosing `log_context` block once they are known (the job's model, say); none: no-op."""
    current = _context.get()
    if current is not None:
        current.update(fields)  # the block's own dict: gone when the block ends


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context.get() or {})
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    """Send the root logger's records to stderr as JSON lines; calling it again changes only the level."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level.upper())
