"""Request parsing: JSON bodies, query options and multipart uploads read as a stream."""
from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import orjson
from flask import Request, request
from pydantic import BaseModel, ValidationError
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from shared.errors import InvalidFile, InvalidParameter, MalformedJson, TooLarge, UnsupportedMediaType

_READ = 256 * 1024


def is_json(request: Request) -> bool:
    mt = request.mimetype
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))


def json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body; 415 for another content type, 400 for a body that is not JSON."""
    return json_body_and_bytes(request, max_bytes)[1]


def json_body_and_bytes(request: Request, max_bytes: int) -> tuple[bytes, Any]:
    """The body's bytes and their parse (see json_body)."""
    if not is_json(request):
        shown = request.mimetype or "none"
        raise UnsupportedMediaType(f"Content type {shown} is not accepted here; send application/json.")
    data = read_body(request, max_bytes)
    try:
        return data, orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedJson(f"The body is not valid JSON: {e}.") from e


def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, whatever its content type; 413 past max_bytes (MAX_JSON_BYTES)."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise TooLarge(f"The body is larger than the {max_bytes} bytes accepted (MAX_JSON_BYTES).",
                       details={"limit": "MAX_JSON_BYTES", "max": max_bytes})
    # A read of n bytes first allocates n: ask for what the header announces (plus one), not for MAX_JSON_BYTES.
    data = request.stream.read(max_bytes + 1 if length is None else length + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"The body is larger than the {max_bytes} bytes accepted (MAX_JSON_BYTES).",
                       details={"limit": "MAX_JSON_BYTES", "max": max_bytes})
    return data


def validated(model: type[BaseModel], data: Any) -> Any:
    """Validate options with their schema; every problem is named in details.fields."""
    if not isinstance(data, dict):
        raise InvalidParameter("The body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        fields = [{"name": ".".join(str(p) for p in err["loc"]) or "body", "code": err["type"], "message": err["msg"]}
                  for err in e.errors(include_url=False, include_input=False)]
        first = fields[0]
        raise InvalidParameter(f"Invalid {first['name']!r}: {first['message']}.", details={"fields": fields}) from e


def parse_bool(name: str, raw: str | None, default: bool = False) -> bool:
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise InvalidParameter(f"Query parameter {name!r} must be true or false, not {raw!r}.",
                           details={"fields": [{"name": name, "code": "invalid_parameter", "message": "expected true or false"}]})


def option_fields(raw: dict[str, str]) -> dict[str, Any]:
    """Form or query values as option values: `metadata` is a JSON object in a string."""
    out: dict[str, Any] = dict(raw)
    if "metadata" in out:
        try:
            out["metadata"] = orjson.loads(out["metadata"])
        except orjson.JSONDecodeError as e:
            raise InvalidParameter("'metadata' must be a JSON object, e.g. {\"team\": \"a\"}.",
                                   details={"fields": [{"name": "metadata", "code": "malformed_json", "message": str(e)}]}) from e
    return out


class MultipartUpload:
    """Reads a multipart body as it arrives: the fields before the `file` part, then the file as a stream."""

    def __init__(self, request: Request, max_field_bytes: int = 1 << 20):
        _, params = parse_options_header(request.headers.get("Content-Type", ""))
        boundary = params.get("boundary")
        if not boundary:
            raise InvalidParameter("The multipart body has no boundary in its Content-Type header.")
        self._input = request.stream
        self._decoder = MultipartDecoder(boundary.encode("latin-1"), max_form_memory_size=max_field_bytes)
        self._events = self._iter_events()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.content_type: str | None = None
        self._field_name: str | None = None
        self._field_parts: list[bytes] = []

    def _iter_events(self) -> Iterator[Any]:
        eof = False
        while True:
            try:
                event = self._decoder.next_event()
            except ValueError as e:
                raise InvalidFile(f"The multipart body is malformed: {e}.") from e
            if event is NEED_DATA:
                if eof:
                    raise InvalidFile("The upload ended before the multipart body was complete.")
                data = self._input.read(_READ)
                eof = not data
                self._decoder.receive_data(data or None)
                continue
            yield event
            if isinstance(event, Epilogue):
                return

    def read_until_file(self) -> bool:
        """Read form fields up to the `file` part; True when one was found."""
        for event in self._events:
            if isinstance(event, File):
                if event.name == "file":
                    self.filename = event.filename or None
                    self.content_type = event.headers.get("Content-Type")
                    return True
                self._skip_part()
            elif isinstance(event, Field):
                self._field_name, self._field_parts = event.name, []
            elif isinstance(event, Data) and self._field_name is not None:
                self._field_parts.append(event.data)
                if not event.more_data:
                    try:
                        self.fields[self._field_name] = b"".join(self._field_parts).decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise InvalidParameter(f"Form field {self._field_name!r} is not UTF-8 text.") from e
                    self._field_name = None
        return False

    def _skip_part(self) -> None:
        for event in self._events:
            if isinstance(event, Data) and not event.more_data:
                return

    def file(self) -> io.RawIOBase:
        """The file part's bytes as a readable stream; reading ends at the part's end."""
        return _PartStream(self._events)


def refuse_encoded_bodies() -> None:
    """A body sent compressed (Content-Encoding) is refused, never inflated: its real size is unknown until then."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed.",
                                   details={"accepted": ["identity"]})


class HashingStream(io.RawIOBase):
    """Passes a stream's bytes through, adding each to a digest on the way (none: nothing to hash)."""

    def __init__(self, stream: io.RawIOBase, digest: Any | None):
        self._stream = stream
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._stream.readinto(b)
        if n and self._digest is not None:
            self._digest.update(memoryview(b)[:n])
        return n

    def drain(self) -> None:
        """Read to the end (what a reader left unread still counts in the digest)."""
        while self.read(1 << 20):
            pass


class _PartStream(io.RawIOBase):
    def __init__(self, events: Iterator[Any]):
        self._events = events
        self._buffer = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._buffer and not self._done:
            event = next(self._events, None)
            if event is None:
                raise InvalidFile("The upload ended before the file part was complete.")
            if isinstance(event, Data):
                self._buffer = event.data
                self._done = not event.more_data
            elif not isinstance(event, Data):
                self._done = True
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n
