"""Settings of the running process that gentron applies: at start-up (the `gentron` command and the benchmarks,
`keep_freed_memory`) and while a stage runs (`sigterm_as_interrupt`)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts: blocks up to 32 MiB come from the heap and are reused
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of giving it back to the OS
_TOP_PAD = 256 << 20  # grow the heap in large steps (address space; pages are only touched when used)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS. True if applied.

    PyTorch's CPU tensors come from malloc. By default glibc maps large blocks fresh for each allocation and
    trims freed heap back to the OS, so each forward pass of a model on the CPU faults its activations' pages
    in again. That costs more the larger the tensors, and more in a virtual machine: on a 2-core VM one
    batched guidance step of an S/2-width video model (3 x 2048 tokens) went from about 5 % slower than three
    separate passes to about 10 % faster. (jemalloc or tcmalloc through LD_PRELOAD, which PyTorch's CPU
    tuning guides suggest, avoid the same cost.) Left alone when any MALLOC_* tunable is set in the
    environment, and where the C library is not glibc.
    """
    if any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (looking it up fails off glibc)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: what Slurm, Kubernetes and other schedulers send before they kill a job (preemption, the
    end of its time). A KeyboardInterrupt, so every cleanup Ctrl-C runs also runs for it; the CLI ends with exit
    status 143 (128 + 15, the convention schedulers expect) instead of Ctrl-C's 130."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt.

    Nothing changes outside the main thread (Python delivers signals there only), or where SIGTERM is ignored
    (the process was started to ignore it). The handler before the block is restored after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
