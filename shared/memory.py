"""Keeping the big, short-lived buffers of uploads and downloads from lingering in a process's memory."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 512 * 1024


def return_big_buffers() -> bool:
    """Have malloc map each buffer of 512 KiB or more on its own, and unmap it when freed.

    glibc raises that threshold by itself (up to 32 MiB) once such a buffer is freed, so the few-MiB pieces an
    upload or a download passes through would then come from the heap and stay in the process's resident memory
    (about 80 MiB more per web process after a 1,000,000-row job and its downloads; bench/README.md). Returns
    whether the setting took; other C libraries (musl, macOS) are left as they are.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
