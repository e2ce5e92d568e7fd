"""User-facing errors.

A `GentronError` is a mistake the user can fix (wrong path, bad option, model/encoder mismatch).
The CLI prints its message and hint without a traceback and exits with status 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class GentronError(Exception):
    """An error the user can fix: `message` says what is wrong (naming the file), `hint` how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"

    def __reduce__(self):  # keep the hint when a worker process sends the error back
        return (type(self), (self.message, self.hint))


# errno -> (what happened, how to fix it): the storage faults a user can fix, whatever stage hits them
_STORAGE_ERRORS = {
    errno.ENOSPC: (
        "disk full while writing {path}",
        "free some space, then rerun the same command: finished work is kept",
    ),
    errno.EDQUOT: (
        "disk quota exceeded while writing {path}",
        "free some space or raise the quota, then rerun the same command",
    ),
    errno.EROFS: ("{path} is on a read-only file system", "write the output to a writable folder"),
    errno.EACCES: (
        "permission denied: {path}",
        "write the output to a folder you may write to (or fix its permissions)",
    ),
    errno.EPERM: (
        "operation not permitted: {path}",
        "write the output to a folder you may write to (or fix its permissions)",
    ),
    errno.ENOENT: (
        "{path} does not exist (its parent folder is missing)",
        "create the parent folder or pass an existing one",
    ),
}


def storage_error(exc: OSError, path=None) -> GentronError | None:
    """The user-facing error for an OSError a user can fix (full disk, quota, read-only, permissions,
    missing parent folder), naming `path` (default: the file the OSError names); None for any other OSError."""
    known = _STORAGE_ERRORS.get(exc.errno)
    if known is None:
        return None
    where = path if path is not None else (exc.filename or "the output")
    message, hint = known
    return GentronError(message.format(path=where) + f" ({exc.strerror or exc})", hint)


class Preempted(Exception):
    """SIGTERM (what Slurm, Kubernetes and other schedulers send before SIGKILL) stopped a stage after it saved its
    work. The CLI says so in one line and exits with 143 (128 + SIGTERM), the code schedulers expect."""

    EXIT_CODE = 143

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def require(ok: bool, message: str, hint: str | None = None) -> None:
    """The one way a config refuses a setting: its `check()` states each rule as `require(rule, message, hint)`."""
    if not ok:
        raise GentronError(message, hint)


class BadSample(Exception):
    """One input item cannot be used. Pipelines catch it, record `reason` in the stats, and go on.

    `transient`: the cause may pass without the item changing (an I/O or permission error, a timeout): a stage
    redoes a shard with such failures on its next run. Otherwise (corrupt, too short, no caption) the item is
    lost until it is fixed.
    """

    def __init__(self, reason: str, detail: str = "", field: str | None = None, transient: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # short, stable category used for counting (e.g. "corrupt", "too_short")
        self.detail = detail
        self.field = field  # the item's field at fault, when one is (e.g. "latent_mean.npy")
        self.transient = transient

    def __reduce__(self):
        return (type(self), (self.reason, self.detail, self.field, self.transient))


def require_dir(path, what: str, hint: str | None = None):
    """Return `path` as a Path if it is an existing folder, else raise a GentronError naming it."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise GentronError(f"{what} not found: {p}", hint or "check the path")
    if not p.is_dir():
        raise GentronError(f"{what} is not a folder: {p}", hint or "pass a folder")
    return p
