"""Run every benchmark (the learning benchmark aside) and print one summary table, then each benchmark's JSON line.

    python benchmarks/run_all.py                  # quick modes: the same ratios, medians over paired rounds, about 2.5
    min on 2 cores
    python benchmarks/run_all.py --only model,sample
    python benchmarks/run_all.py --full           # each benchmark's default (longer) settings
    python benchmarks/run_all.py --smoke          # every benchmark's smoke mode: seconds each, figures mean nothing

Each benchmark runs as a subprocess (`python benchmarks/NAME.py OPTIONS`); its last stdout line is its JSON
object (benchmarks/results.py): {"benchmark", "ratios", "goals", "met", "figures", "threads"}. A benchmark
that cannot run here (a missing optional package, no CUDA GPU for gpu_check) says so in "skipped"; one that
crashes, times out or prints no JSON line is reported as FAILED with the end of its stderr. Both show in the
table, and run_all exits 1 when any benchmark failed. Unmet goals are reported, not treated as failures.
The benchmarks' own tables go to stderr with --verbose, or to files with --logs DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from results import check_line, goal_met  # noqa: E402


@dataclass(frozen=True)
class Benchmark:
    script: str  # a path relative to benchmarks/ (or absolute)
    quick: tuple[str, ...] = ("--quick",)  # run_all's default: bounded, but the same ratios
    smoke: tuple[str, ...] = ("--smoke",)
    full: tuple[str, ...] = ()


BENCHMARKS = {
    "model": Benchmark("bench_model.py"),  # T2I vs PixArt, T2V vs Latte, at 1 and 2 threads
    "prep": Benchmark("bench_prep.py"),  # prep-videos vs raw decode, 2 workers vs 1
    "sample": Benchmark("bench_sample.py"),  # batched CFG / MFG vs separate passes, T/2 and S/2 width, 1 and 2 threads
    "encode": Benchmark("bench_encode.py"),  # encode-latents / encode-text, share of time outside the model
    "train": Benchmark("bench_train.py"),  # activation checkpointing, loader vs training
    "image_frames": Benchmark("bench_image_frames.py"),  # T2V step: images as one latent frame vs pseudo-videos
    "buckets": Benchmark("bench_buckets.py"),  # a bucketed training step vs a fixed-size one, per token
    "gpu_check": Benchmark("gpu_check.py", quick=()),  # skipped without a CUDA GPU; about 6 minutes with one
}


def run_benchmark(name: str, bench: Benchmark, mode: str, timeout: float, log_dir: Path | None, verbose: bool) -> dict:
    """Run one benchmark as a subprocess; its JSON object, or a stand-in saying why there is none ("error")."""
    script = Path(bench.script) if Path(bench.script).is_absolute() else HERE / bench.script
    cmd = [sys.executable, str(script), *getattr(bench, mode)]
    print(f"[run_all] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        stdout, stderr, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        stdout, stderr, rc = _text(err.stdout), _text(err.stderr), None
    seconds = time.perf_counter() - start
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    if verbose:
        print(stdout + stderr, file=sys.stderr, flush=True)
    print(f"[run_all] {name}: {seconds:.1f} s" + ("" if rc == 0 else f" (exit {rc})"), file=sys.stderr, flush=True)

    obj, why = None, None
    lines = [line for line in stdout.splitlines() if line.strip()]
    if rc is None:
        why = f"timed out after {timeout:.0f} s"
    elif rc != 0:
        why = f"exit status {rc}"
    elif not lines:
        why = "printed nothing on stdout"
    else:
        try:
            obj = json.loads(lines[-1])
        except json.JSONDecodeError:
            why = f"last stdout line is not JSON: {lines[-1][:120]!r}"
        else:
            problems = check_line(obj) if isinstance(obj, dict) else ["not a JSON object"]
            if problems:
                obj, why = None, "malformed JSON line: " + "; ".join(problems)
    if obj is None:
        tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
        obj = {
            "benchmark": name,
            "error": why + (f": {tail}" if tail else ""),
            "ratios": {},
            "goals": {},
            "met": {},
            "figures": {},
            "threads": 0,
        }
    obj["seconds"] = round(seconds, 1)
    return obj


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _measured(value) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}"


def summary_table(results: list[tuple[str, dict]]) -> str:
    """One row per ratio: benchmark, ratio, measured, goal, met; one row per skipped or failed benchmark."""
    header = ("benchmark", "ratio", "measured", "goal", "met")
    rows: list[tuple[str, ...]] = []  # 5 cells, or (benchmark, note) for a benchmark without ratios
    goals = met = skipped = failed = 0
    for name, obj in results:
        if "error" in obj:
            failed += 1
            rows.append((name, f"FAILED: {obj['error']}"))
            continue
        if "skipped" in obj:
            skipped += 1
            rows.append((name, f"skipped: {obj['skipped']}"))
            continue
        for ratio_name, value in obj["ratios"].items():
            goal = obj["goals"].get(ratio_name)
            ok = goal_met(value, goal) if goal else None
            goals += goal is not None
            met += bool(ok)
            rows.append(
                (name, ratio_name, _measured(value), goal or "-", "" if goal is None else "yes" if ok else "NO")
            )
        for goal_name in sorted(obj["goals"].keys() - obj["ratios"].keys()):
            goals += 1
            rows.append((name, goal_name, "n/a", obj["goals"][goal_name], "NO"))
        if not obj["ratios"] and not obj["goals"]:
            rows.append((name, "(no ratios)"))
    full = [header] + [r for r in rows if len(r) == 5]
    widths = [max(len(r[c]) for r in full) for c in range(5)]
    widths[0] = max([widths[0]] + [len(r[0]) for r in rows])

    def line(cells) -> str:
        return "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(cells)).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(r) if len(r) == 5 else f"{r[0].ljust(widths[0])}  {r[1]}" for r in rows]
    lines.append(
        f"{met} of {goals} goals met; {len(results) - skipped - failed} benchmark(s) ran, {skipped} skipped, {failed} "
        "failed"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None, benchmarks: dict[str, Benchmark] | None = None) -> int:
    benchmarks = BENCHMARKS if benchmarks is None else benchmarks
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--only", help=f"comma-separated benchmarks, run in this order (of {', '.join(benchmarks)}; default all)"
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--smoke", action="store_true", help="each benchmark's smoke mode: seconds, checks that they run"
    )
    modes.add_argument(
        "--full", action="store_true", help="each benchmark's default settings (longer than the quick modes)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per benchmark before it counts as failed (default 420; smoke 120)",
    )
    parser.add_argument("--logs", type=Path, help="write each benchmark's stdout and stderr to DIR/NAME.log")
    parser.add_argument("--verbose", action="store_true", help="echo each benchmark's own output to stderr")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(benchmarks)
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(benchmarks)}")
    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    timeout = args.timeout or (120.0 if args.smoke else 420.0)

    start = time.perf_counter()
    results = [(name, run_benchmark(name, benchmarks[name], mode, timeout, args.logs, args.verbose)) for name in names]
    print(
        f"[run_all] {len(names)} benchmark(s), {mode} mode, {time.perf_counter() - start:.0f} s in total",
        file=sys.stderr,
        flush=True,
    )
    if args.smoke:
        print("smoke mode: tiny shapes and few steps, so the figures below say nothing about speed\n")
    print(summary_table(results))
    print()
    for _, obj in results:
        print(json.dumps(obj))
    sys.stdout.flush()
    return 1 if any("error" in obj for _, obj in results) else 0


if __name__ == "__main__":
    sys.exit(main())
