"""Memory that big, short-lived buffers took goes back to the system once a request or a chunk is done."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Buffers of 1 MiB, each followed by a small one that stays (4 KiB: from malloc's heap, not Python's own
# allocator): freed, they leave holes in the heap that glibc keeps (it trims only the heap's top on its own),
# the memory a finished upload would otherwise hold.
_PROGRAM = """
from shared.memory import release_freed_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) >> 10

big, small = [], []
b = bytearray(2 << 20)  # freed, it raises glibc's mmap threshold: the buffers below come from the heap
del b
for i in range(200):
    big.append(bytearray(1 << 20))
    big[-1][::4096] = b"x" * 256  # touched: resident
    small.append(bytearray(4096))
del big
held = rss_mib()
released = release_freed_memory()
print(held, rss_mib(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc_trim")
def test_freed_buffers_go_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, check=True)
    held, after, released = out.stdout.split()
    assert released == "True"
    assert int(held) - int(after) > 150, out.stdout  # of the 200 MiB freed


def test_uploads_downloads_and_chunks_release_what_they_took():
    import api.jobs
    import worker.tasks
    from shared.memory import release_freed_memory
    assert release_freed_memory.__name__ in api.jobs.create_job.__code__.co_names
    assert release_freed_memory.__name__ in api.jobs._then_release.__code__.co_names
    assert api.jobs._then_release.__name__ in api.jobs._download.__code__.co_names
    assert release_freed_memory.__name__ in worker.tasks._process_chunk.__code__.co_names
