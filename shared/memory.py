"""Giving the memory that uploads, downloads and chunks pass through back to the system once they are done."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import pyarrow as pa


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> bool:
    """Return the free pages malloc holds, in every arena, to the system (glibc's malloc_trim).

    Called once a process is done with the megabytes a request or a job moved through it: after an upload is
    stored, after a download is sent, when a job a worker was running ends. Until then glibc reuses the buffers
    it freed, with no new page faults. (Fixing its mmap threshold low, so that every buffer of 512 KiB or more is
    mapped and unmapped on its own, cost a page fault per 4 KiB of each: 0.3 of the 0.9 CPU-seconds the API spent
    reading a 1,000,000-row CSV upload; bench/README.md.) Returns whether anything was given back; False where
    the C library has no malloc_trim (musl, macOS).
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def arrow_allocates_with_malloc() -> None:
    """Have Arrow take its buffers from malloc, so that `release_freed_memory` gives them back too.

    Arrow's own default allocator (mimalloc) keeps what it freed for reuse: after a 1,000,000-row JSON Lines
    download, the web process stayed up to 30 MiB larger than with malloc (bench/README.md). For the web
    processes, whose requests come and go; workers keep Arrow's default.
    """
    pa.set_memory_pool(pa.system_memory_pool())
