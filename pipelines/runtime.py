"""Settings of the running process that gentron applies at start-up (the `gentron` command and the benchmarks)
and while a stage runs (`StopRequest`: what SIGTERM does)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts: blocks up to 32 MiB come from the heap and are reused
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of giving it back to the OS
_TOP_PAD = 256 << 20  # grow the heap in large steps (address space; pages are only touched when used)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived in a `StopRequest(at_once=True)` block. A KeyboardInterrupt, so that every cleanup Ctrl-C
    runs also runs for it and no `except Exception` on its way swallows it; the block's owner turns it into
    `errors.Preempted` once it has cleaned up."""


class StopRequest:
    """Notes SIGTERM instead of dying of it, for the duration of a `with` block in the main thread.

    Schedulers (Slurm, Kubernetes) send SIGTERM some time before SIGKILL. A long loop checks `requested` between
    units of work (a training step), saves what it has and raises `errors.Preempted`. With `at_once`, SIGTERM
    instead raises `Terminated` where the main thread is, as Ctrl-C does: for work whose unfinished unit is
    cheap to drop and may be long to finish (a data stage's shard). Outside the main thread, where Python cannot
    install handlers, it does nothing (SIGTERM keeps its default action).
    """

    def __init__(self, at_once: bool = False):
        self.requested = False
        self.at_once = at_once
        self._previous = None

    def _note(self, signum, frame) -> None:
        first, self.requested = not self.requested, True
        if self.at_once and first:  # a second SIGTERM must not cut short the cleanup the first one started
            raise Terminated()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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
