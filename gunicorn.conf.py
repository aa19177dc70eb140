"""gunicorn reads this file from its working directory (the repository root, for the Procfile and the tests).

* Before it opens a port, gunicorn checks its bind addresses: without API keys it serves only on loopback
  addresses, unless AUTH=off says so explicitly, and it logs which case applies.
* The errors gunicorn answers itself, before the app sees a request (a request line over `limit_request_line`,
  4094 bytes by default; more than `limit_request_fields` header fields, 100, or one over
  `limit_request_field_size`, 8190 bytes; a request that is not HTTP), get the contract's JSON error body instead
  of gunicorn's HTML page.
* With `--reuse-port` (the Procfile's web line) a second server would bind the same port too and silently take
  part of the connections: gunicorn refuses to start when something already listens on a port it is to bind.
* Its worker processes share one PROMETHEUS_MULTIPROC_DIR, so that /metrics on any of them counts the requests of
  all: a fresh temporary directory when the variable is unset, else the directory it names, emptied at start
  (counts left from an earlier run would be added to this one's).
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile

import orjson
from gunicorn import util

from shared.auth import ExposedWithoutKeys, KeyFileError, startup_mode
from shared.settings import load_settings

_CODES = {400: ("bad_request", "The request is not valid HTTP."),
          403: ("forbidden", "The request is not allowed."),
          414: ("uri_too_long", "The request line (method, path and query) is longer than this service accepts."),
          417: ("expectation_failed", "The request's Expect header cannot be met."),
          431: ("headers_too_large", "The request has more, or longer, header fields than this service accepts."),
          501: ("not_implemented", "The request's transfer coding is not supported.")}


def _write_json_error(sock, status_int, reason, mesg):  # noqa: ARG001 - gunicorn's signature; mesg may echo input
    """gunicorn's `util.write_error`, answering JSON: the code and a fixed message, never the request's bytes."""
    code, message = _CODES.get(status_int, ("internal_error", "The service failed to handle this request."))
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


# Workers are forked from the master after this file is read, so they call this one.
util.write_error = _write_json_error


class _RedactBearer(logging.Filter):
    """gunicorn logs a malformed header line as it came; a key in it must not reach the log."""

    _BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"\\]+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "earer" in message:
            record.msg, record.args = self._BEARER.sub(r"\1[redacted]", message), None
        return True


def on_starting(server):
    """Refuse to start, before any port is opened, when other machines could reach a service that has no keys."""
    server.log.error_log.addFilter(_RedactBearer())
    settings = load_settings()
    try:
        line = startup_mode(settings.AUTH, settings.API_KEYS_FILE or None, server.cfg.address)
    except (ExposedWithoutKeys, KeyFileError) as e:
        server.log.error("auth: %s", e)
        raise RuntimeError(f"predq: {e}") from None  # gunicorn prints it too, and exits with status 1
    server.log.info(line)
    _refuse_taken_ports(server)
    _share_metrics(server)


def _refuse_taken_ports(server) -> None:
    """Stop before serving when another process listens on a TCP address this server is to bind.

    The probe binds as gunicorn does but without SO_REUSEPORT: Linux then refuses it only for a listening socket
    (SO_REUSEADDR lets it past connections of a server just stopped). Sockets handed over by a re-executed master
    or by systemd are this server's own and are not probed.
    """
    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS"):
        return
    for address in server.cfg.address:
        if not isinstance(address, tuple) or not address[1]:
            continue  # a unix socket, or port 0
        host, port = address[0], address[1]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    continue  # gunicorn's own bind reports anything else
                message = (f"{host}:{port} is already in use by another server (another predq?): stop it, or "
                           "choose another PORT")
                server.log.error("bind: %s", message)
                raise RuntimeError(f"predq: {message}") from None


_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_made_metrics_dir: list[str] = []


def _share_metrics(server) -> None:
    """Before any worker is forked (and imports prometheus_client), point all of them at one metrics directory."""
    path = os.environ.get(_METRICS_DIR)
    if path:
        os.makedirs(path, exist_ok=True)
        for leftover in glob.glob(os.path.join(path, "*.db")):
            os.remove(leftover)
    else:
        path = tempfile.mkdtemp(prefix="predq-metrics-")
        _made_metrics_dir.append(path)
        os.environ[_METRICS_DIR] = path
    server.log.info("metrics: web processes count into %s", path)


def child_exit(server, worker):
    """A worker that exits leaves its counts (they still add up), but not its live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory made for this run."""
    for path in _made_metrics_dir:
        shutil.rmtree(path, ignore_errors=True)
