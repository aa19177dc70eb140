"""The malloc setting that returns big freed buffers to the system takes effect (its effect: bench/README.md)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="a glibc setting")
def test_web_and_worker_processes_set_a_fixed_mmap_threshold():
    program = ("from shared.memory import return_big_buffers; print(return_big_buffers())")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    import api
    import worker.tasks
    from shared.memory import return_big_buffers
    assert return_big_buffers.__name__ in api.create_app.__code__.co_names
    assert return_big_buffers.__name__ in worker.tasks._one_thread_per_process.__code__.co_names
