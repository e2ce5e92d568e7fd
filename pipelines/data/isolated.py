"""A child process that runs generator functions and is killed when one step takes too long.

prep-videos decodes each video in such a child: a decoder stuck in native code (a damaged file can make
FFmpeg loop) then costs one video, not the run, and a decoder that crashes the process costs one video
too. One child serves many calls (starting one costs about as much as preparing a small video).

The child is a plain `python -c` process (not multiprocessing's spawn, which would re-import the
parent's __main__, e.g. the whole CLI, in every child). It ignores SIGINT and SIGTERM: Ctrl-C and a
scheduler's SIGTERM reach the whole process group, and the parent, which handles them, stops its
children (`IsolatedProcess.stop`, `close`); a child left alone by a dead parent sees the socket close and
exits.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from pipelines.errors import BadSample


def _child_entry(fd: int, preload: tuple[str, ...] = ()) -> None:
    """Entry point of the child process: import `preload`, then serve requests on the socket `fd`.

    It leaves with os._exit: it holds nothing to flush, and tearing down numpy and PyAV would cost the
    parent (waiting in `close`) up to 0.1 s per child. It leaves quietly, without a traceback, when the
    parent is gone.
    """
    try:
        for module in preload:  # before "ready": imports are not part of the first call's time limit
            importlib.import_module(module)
        _child_main(Connection(fd))
    except (EOFError, OSError):  # BrokenPipeError, ConnectionResetError: the parent is gone
        pass
    os._exit(0)


def _child_main(conn) -> None:
    conn.send(("ready", None))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        try:
            for item in fn(*args):
                conn.send(("item", item))
            conn.send(("end", None))
        except BadSample as exc:
            conn.send(("bad", exc))
        except (EOFError, OSError) as exc:
            if isinstance(exc, (EOFError, BrokenPipeError, ConnectionResetError)):
                return
            conn.send(("bad", BadSample("decode_error", f"{type(exc).__name__}: {exc}")))
        except Exception as exc:  # an unexpected failure is one bad item, not a dead run
            detail = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3)[-400:]}"
            conn.send(("bad", BadSample("decode_error", detail)))


class Stopped(Exception):
    """The child was stopped on purpose (IsolatedProcess.stop: the run is ending), not a bad item."""


class IsolatedProcess:
    """Runs generator functions in one child process; a step slower than `timeout` seconds kills it.

    `run(fn, *args)` yields what `fn(*args)` yields in the child. A timeout raises BadSample("timeout"),
    a dead child BadSample("crashed"), a BadSample in the child is re-raised here. A killed child is
    replaced by a fresh one on the next call. `fn` must be a module-level function (it is pickled by
    name). `preload`: modules the child imports before it is ready (those `fn` needs), so that their
    import is not counted in the first call's timeout.
    """

    def __init__(self, timeout: float, preload: tuple[str, ...] = ()):
        self.timeout = timeout
        self.preload = tuple(preload)
        self._process: subprocess.Popen | None = None
        self._conn = None
        self._stopped = False  # by stop(): no new child, and a killed one is not a bad item

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        # The signals are ignored before anything is imported: a Ctrl-C while the child starts must not print a
        # traceback, and a SIGTERM to the group must not kill it as a "crashed" video before the parent stops the run
        code = (
            "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)"
            f"; from pipelines.data.isolated import _child_entry; _child_entry({child_sock.fileno()}, {self.preload!r})"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL
        )
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        # A child that cannot even start is a broken environment, not a bad item: fail loudly.
        try:
            ready = self._conn.poll(120) and self._conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise RuntimeError("the child process failed to start (see its error above)")

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def run(self, fn: Callable[..., Iterator[Any]], *args) -> Iterator[Any]:
        if self._stopped:
            raise Stopped("the child process was stopped")
        if not self._alive():
            self._kill()
            self._start()
        finished = False
        try:
            self._conn.send((fn, args))
            while True:
                if not self._conn.poll(self.timeout):
                    raise BadSample(  # transient: a loaded machine or a slow network disk can cause it
                        "timeout",
                        f"no progress in {self.timeout:g} s (decoder stuck?); the child process was killed",
                        transient=True,
                    )
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError) as exc:
                    if self._stopped:
                        raise Stopped("the child process was stopped") from exc
                    raise BadSample("crashed", f"the child process died (exit code {self._process.wait()})") from exc
                if kind == "item":
                    yield payload
                elif kind == "end":
                    finished = True
                    return
                else:
                    finished = True
                    raise payload
        finally:
            if not finished:
                self._kill()  # stopped mid-stream (timeout, crash, consumer gave up): its state is unknown

    def stop(self) -> None:
        """Kill the child from another thread than the one running it: its `run` raises Stopped, and no
        child is started again. Only signals the process; the running thread (or `close`) cleans up."""
        self._stopped = True
        process = self._process
        if process is not None:
            try:
                process.kill()
            except OSError:
                pass  # already gone

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def close(self) -> None:
        if self._alive():
            self._conn.close()  # the child sees EOF and exits
            self._conn = None
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def __enter__(self) -> IsolatedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
