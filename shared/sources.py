"""Sources: input files the workers read themselves, allowed only under configured roots."""
from __future__ import annotations

import os
import stat
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from shared.errors import InvalidFile, PredqError, TooLarge


class SourceNotAllowed(PredqError):
    status, code = 403, "source_not_allowed"


def _local_path(uri: str) -> str | None:
    """The file system path of a plain path or file:// URI; None for other schemes."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return unquote(parts.path) if parts.scheme else uri
    return None


def _has_dot_dot(path: str) -> bool:
    return ".." in path.replace("\\", "/").split("/")


def check_allowed(uri: str, roots: list[str]) -> str:
    """The URI if it lies under one of the roots; 403 source_not_allowed otherwise.

    Local paths are compared after resolving symlinks, so a link inside a root that points outside it is refused;
    `..` segments are refused outright.
    """
    refuse = SourceNotAllowed(f"The source {uri!r} is not under an allowed root; allowed roots are set by the "
                              "operator (SOURCE_ROOTS).")
    if not roots or _has_dot_dot(urlsplit(uri).path):
        raise refuse
    path = _local_path(uri)
    for root in roots:
        root_path = _local_path(root)
        if path is not None and root_path is not None:
            if not os.path.isabs(path):
                continue
            real, real_root = os.path.realpath(path), os.path.realpath(root_path)
            if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
                return uri
        elif path is None and root_path is None:
            prefix = root if root.endswith("/") else root + "/"
            if uri.startswith(prefix):
                return uri
    raise refuse


def open_source(uri: str, max_bytes: int | None = None) -> BinaryIO:
    """Open a source for reading as a stream (any fsspec URL; s3:// and others need their fsspec package).

    A local source must be a regular file (a FIFO or a device could block or never end) of at most `max_bytes`
    (MAX_UPLOAD_BYTES; readers count the bytes of other sources as they read them).
    """
    import fsspec

    path = _local_path(uri)
    if path is not None:
        try:
            info = os.stat(path)
        except FileNotFoundError as e:
            raise InvalidFile(f"The source {uri} does not exist.") from e
        except OSError as e:
            raise InvalidFile(f"The source {uri} cannot be read: {e.strerror or e}.") from e
        if not stat.S_ISREG(info.st_mode):
            raise InvalidFile(f"The source {uri} is not a regular file.")
        if max_bytes is not None and info.st_size > max_bytes:
            raise TooLarge(f"The source {uri} is larger than the {max_bytes} bytes accepted (MAX_UPLOAD_BYTES).",
                           details={"limit": "MAX_UPLOAD_BYTES", "max": max_bytes})
    try:
        return fsspec.open(uri, "rb").open()
    except FileNotFoundError as e:
        raise InvalidFile(f"The source {uri} does not exist.") from e
    except (ImportError, ValueError) as e:
        raise InvalidFile(f"The source {uri} cannot be opened: {e}.") from e
    except OSError as e:
        raise InvalidFile(f"The source {uri} cannot be read: {e.strerror or e}.") from e
