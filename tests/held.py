"""Work held on purpose, for tests that stop a run in the middle (Ctrl-C, SIGTERM, SIGKILL): instead of sleeping
and hoping the run is where the test wants it, the held work writes a marker file and waits for one, so the test
knows where the run is and the run cannot finish before the test acts, however loaded the machine.

Child processes (prep-videos' decode children, a stage's worker processes) import this module to unpickle
the functions: run them with `env_with_tests_on_path()`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _hold(folder: str | Path, name: str) -> None:
    """Write FOLDER/NAME.started, then wait until FOLDER/NAME.go exists (for ever, unless the test creates it)."""
    Path(folder, f"{name}.started").touch()
    while not Path(folder, f"{name}.go").exists():
        time.sleep(0.01)


def held_text_shard(folder: str, held: tuple[str, ...], job, writer, stats, tick) -> None:
    """A stage's shard function (a ShardFn, with `functools.partial(held_text_shard, folder, held)`): writes one
    text sample per item of `job.payload`; shards named in `held` are held (`_hold`) before their first sample."""
    if job.name in held:
        _hold(folder, job.name)
    for i in job.payload:
        stats.samples_in += 1
        writer.write(f"item_{i}", {"txt": f"caption {i}".encode()})
        tick(1)


def video_clips_held(folder: str, stems: tuple[str, ...], path, *args, after: int = 0):
    """`video_clips` as prep-videos' decode child runs it, except for the videos whose stem is in `stems` ("*": all):
    those are held (`_hold`: a decoder that hangs until the test says go, or for ever) once `after` of their clips
    were sent (0: before anything). Pass it as `prep_videos(..., video_work=functools.partial(video_clips_held,
    folder, stems))`."""
    from pipelines.data.video import video_clips

    path = Path(path)
    held = path.stem in stems or "*" in stems
    clips = 0
    if held and after == 0:
        _hold(folder, path.stem)
    for message in video_clips(path, *args):
        yield message
        clips += message[0] == "clip"
        if held and after and clips == after:
            _hold(folder, path.stem)


def video_clips_failing(stems: tuple[str, ...], after: int, path, *args):
    """`video_clips`, except that the videos whose stem is in `stems` fail as a damaged file would once `after`
    of their clips were made."""
    from pipelines.data.video import video_clips
    from pipelines.errors import BadSample

    clips = 0
    for message in video_clips(path, *args):
        if message[0] == "clip" and Path(path).stem in stems:
            if clips == after:
                raise BadSample("corrupt", f"{path}: damaged after clip {after}")
            clips += 1
        yield message


TESTS_DIR = str(Path(__file__).resolve().parent)


def env_with_tests_on_path(env: dict | None = None) -> dict:
    """`env` (default: this process's) with the tests folder first on PYTHONPATH, for child processes that unpickle
    functions of this module."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    return env


def wait_for(condition, seconds: float = 300.0, what: str = "the condition") -> None:
    """Poll `condition()` until it is true; fail after `seconds` (a deadline for a broken run, not a timing)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        time.sleep(0.02)
