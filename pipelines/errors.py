"""User-facing errors.

A `GentronError` is a mistake the user can fix (wrong path, bad option, model/encoder mismatch).
The CLI prints its message and hint without a traceback and exits with status 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class GentronError(Exception):
    """An error the user can fix: `message` says what is wrong (naming the file), `hint` how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class BadSample(Exception):
    """One input item cannot be used. Pipelines catch it, record `reason` in the stats, and go on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # short, stable category used for counting (e.g. "corrupt", "too_short")
        self.detail = detail


def require_dir(path, what: str, hint: str | None = None):
    """Return `path` as a Path if it is an existing folder, else raise a GentronError naming it."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise GentronError(f"{what} not found: {p}", hint or "check the path")
    if not p.is_dir():
        raise GentronError(f"{what} is not a folder: {p}", hint or "pass a folder")
    return p
