"""Files: written so that a crash never leaves half of one under its final name, and their digests.

The one way every gentron module writes a file that something else reads back (shards, stats, options
records, metrics, plots, samples, sidecars, pages, checkpoints): write under a temporary name beside
the final one (`.NAME.tmp-PID`, which folder listings skip), flush it to disk, then rename it into
place (atomic on POSIX). A storage fault (disk full, read-only, no permission) becomes one
GentronError naming the path; the temporary file is removed.

`file_sha256` is the one file digest (shards, source videos, weights, the FID network). `read_input`,
`readable_file` and `unreadable`: reading an input item, where a failure is that item's (a BadSample naming
the file, transient or not), never the run's.

Its own module, below `data/` and everything else (it imports only `pipelines.errors`), so that every
layer can use it without importing the shard format.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from pipelines.errors import BadSample, GentronError, storage_error

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights formats that can run code when loaded
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


def temp_path(path: str | Path) -> Path:
    """The temporary name `path` is written under first (hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def disk_error(path: Path, exc: OSError) -> Exception:
    """A storage fault the user can fix as one message naming `path`; any other OSError unchanged."""
    return storage_error(exc, path) or exc


# errno -> (reason, transient, what to do), for an input item that cannot be read
_READ_ERRORS = {
    errno.EACCES: ("permission_denied", True, "make it readable by this user; the next run retries it"),
    errno.EPERM: ("permission_denied", True, "make it readable by this user; the next run retries it"),
    errno.ENOENT: ("missing_file", False, "check the path (a broken symlink, a file moved or deleted)"),
    errno.ELOOP: ("symlink_loop", False, "a symlink that points (through others) back to itself: fix or remove it"),
    errno.EISDIR: ("not_a_file", False, "a folder where a file is expected: rename or remove it"),
}


def unreadable(path: str | Path, exc: OSError, what: str = "file") -> BadSample:
    """The BadSample for an input item whose `what` (file, caption) could not be read, naming `path` and the fix.

    Permission and I/O errors (a network filesystem hiccup, a timeout) are transient: the stage redoes the shard
    on its next run. A missing file, a symlink loop, a folder are not.
    """
    reason, transient, fix = _READ_ERRORS.get(
        exc.errno, ("read_error", True, "an I/O error; check the storage, the next run retries it")
    )
    return BadSample(reason, f"{what} {path}: {exc.strerror or exc} ({fix})", transient=transient)


def readable_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file (through symlinks), else the BadSample that says what it is instead. A
    device or a FIFO named like a picture is not read: reading one can block or never end."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise unreadable(path, exc, what) from None
    if stat.S_ISDIR(mode):
        raise BadSample("not_a_file", f"{what} {path} is a folder (rename or remove it)")
    if not stat.S_ISREG(mode):
        raise BadSample("not_a_file", f"{what} {path} is a device, FIFO or socket, not a file (remove it)")
    return path


def read_input(path: str | Path, what: str = "file") -> bytes:
    """The bytes of an input item's file; a BadSample naming it when it cannot be read (see `unreadable`)."""
    path = readable_file(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise unreadable(path, exc, what) from None


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Writers that report a full disk without an errno (safetensors' and torch's serialisers) raise their own
    errors: while the file system holding `path` is full, any error of the block is the "disk full" GentronError.
    OSErrors a user can fix are mapped as everywhere (`disk_error`)."""
    try:
        yield
    except OSError as exc:
        raise disk_error(path, exc) from None
    except Exception as exc:
        stats = os.statvfs(Path(path).parent)
        if stats.f_bavail * stats.f_frsize < FULL_DISK_BYTES:
            raise GentronError(
                f"disk full while writing {path} ({type(exc).__name__}: {exc})",
                "free some space, then rerun the same command: finished work is kept",
            ) from None
        raise


def quietly(cleanup: Callable[[], Any]) -> None:
    """Cleanup after a failure must never replace the first error (a full disk fails the cleanup too)."""
    try:
        cleanup()
    except OSError:
        pass


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _create_new(path: Path) -> int:
    """A descriptor of a new file at `path`, never through a symlink (O_EXCL: a name already there, a symlink
    planted in a shared folder included, is not opened). A leftover of this name (a killed run whose process id
    came round again) is removed first: unlinking removes the name, never what a symlink points to."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        try:
            os.unlink(path)
        except IsADirectoryError:
            raise GentronError(
                f"{path} is a folder; gentron writes a temporary file of that name", f"remove the folder {path}"
            ) from None
        return os.open(path, flags, 0o666)


class CommitOnSuccess:
    """Context manager of a writer with `commit()` and `abort()`: committed on success, aborted on any exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class AtomicFile(CommitOnSuccess):
    """A binary file written under `temp_path(path)`: `commit()` renames it into place, `abort()` removes it.

    As a context manager: committed on success, aborted on any exception."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = temp_path(self.path)
        try:
            self.file: BinaryIO = os.fdopen(_create_new(self.tmp_path), "wb")
        except OSError as exc:
            raise disk_error(self.tmp_path, exc) from None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.abort()
            raise disk_error(self.path, exc) from None

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            self.abort()
            raise disk_error(self.path, exc) from None

    def abort(self) -> None:
        """Remove the temporary file; never raises (it runs while another error is on its way out)."""
        quietly(self.file.close)
        quietly(lambda: self.tmp_path.unlink(missing_ok=True))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring)."""
    with AtomicFile(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | Path, obj, *, indent: int = 1, sort_keys: bool = True, ensure_ascii: bool = True, newline: bool = False
) -> Path:
    """The one JSON writer: `obj` as JSON, atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + ("\n" if newline else "")
    return atomic_write_text(path, text)


def read_json(path: str | Path, what: str, hint: str, expect: type | None = dict):
    """The one JSON reader: the content of `path`, or a GentronError naming the file (`what`: what it should be,
    e.g. "run config") and the fix `hint` when it is missing, unreadable, not JSON or not an `expect` value."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GentronError(f"{what} not found: {path}", hint) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GentronError(f"{what} {path} cannot be read as JSON: {exc}", hint) from None
    if expect is not None and not isinstance(value, expect):
        raise GentronError(f"{what} {path} is not a JSON {'object' if expect is dict else expect.__name__}", hint)
    return value


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def replace_folder(complete: Path, final: Path) -> None:
    """Put the complete folder `complete` (beside `final`) in the place of `final`, whether or not it exists."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)  # two renames: `final` is missing only between them, never half-written
    os.replace(complete, final)
    shutil.rmtree(old, ignore_errors=True)
