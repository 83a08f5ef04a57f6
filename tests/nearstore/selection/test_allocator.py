from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nearstore import keep_freed_memory

# malloc, touch and free a 64 MiB block five times: each time a fresh mmap, faulted page by page,
# unless freed memory is kept. Page faults are counted by the kernel, not timed.
CHURN = """
import ctypes, json, resource, sys
from nearstore import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touch():
    block = libc.malloc(1 << 26)
    ctypes.memset(block, 1, 1 << 26)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc policy; other C libraries differ")
def test_kept_memory_is_not_faulted_in_again():
    default, kept = churn("default"), churn("keep")
    assert kept["kept"] is True
    assert default["faults"] > 5 * 16_000  # 64 MiB is 16,384 pages, faulted again each time
    assert kept["faults"] < 1_000


def test_bad_block_size_is_named():
    with pytest.raises(ValueError, match="largest_block must be in"):
        keep_freed_memory(0)
