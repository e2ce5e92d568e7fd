"""Process settings: glibc's malloc keeps freed memory for reuse (pipelines.runtime.keep_freed_memory)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

# In a fresh interpreter: free a 24 MiB block and report how much freed memory the heap still holds
# (mallinfo2's fordblks, or mallinfo's before glibc 2.33). By default glibc maps a block that size fresh
# (or trims it away once freed); with keep_freed_memory it comes from the heap and stays there for the
# next allocation.
CHILD = """
import ctypes, sys
from pipelines.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False

libc = ctypes.CDLL(None)
wide = hasattr(libc, "mallinfo2")
field = ctypes.c_size_t if wide else ctypes.c_int

class Mallinfo(ctypes.Structure):
    NAMES = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    _fields_ = [(n, field) for n in NAMES]

mallinfo = libc.mallinfo2 if wide else libc.mallinfo
mallinfo.restype = Mallinfo
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)  # touch its pages
libc.free(block)
print(applied, mallinfo().fordblks >= size)
"""


def run_child(mode: str, **env) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"} | env
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=environ, check=True)
    return done.stdout.split()


def test_freed_memory_stays_in_the_heap_for_reuse():
    from pipelines.runtime import keep_freed_memory

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):  # another C library: nothing is tuned
        assert keep_freed_memory() is False
        return
    assert run_child("default") == ["False", "False"]  # glibc's default: the freed 24 MiB is not kept
    assert run_child("keep") == ["True", "True"]
    # a user's own malloc tunables are left alone
    assert run_child("keep", MALLOC_ARENA_MAX="2") == ["False", "False"]
