"""Evaluation during training (`--eval-every`), TensorBoard event files (`--log-to tensorboard`) and the run page.

Tiny runs as in test_train.py, on shards whose metadata names tiny text encoders saved to disk (so the
evaluation's `gentron sample` code can load them), with the tiny CLIP and FID Inception of
pipelines.model.tiny_eval as the metric models.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from tiny import TINY_SPEC
from train_data import sample_fields, write_empty_caption
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.shards import ShardWriter, shard_name
from pipelines.evaluate.evaluator import GaussianStats, save_statistics
from pipelines.model.fid_inception import load_fid_inception
from pipelines.model.text_encoders import TextEncoders
from pipelines.model.tiny import build_tiny_clip, build_tiny_t5
from pipelines.model.tiny_eval import build_tiny_clip_model, build_tiny_fid_inception
from pipelines.model_folder import PipelineRecord
from pipelines.train import config as train_config
from pipelines.train.config import TrainConfig
from pipelines.train.evaluation import TrainingEvaluator
from pipelines.train.metrics import read_metrics
from pipelines.train.trainer import train

IMAGE_PROMPTS = "a red square in the top left\n# a comment\na blue square in the bottom right\n"
VIDEO_PROMPTS = "a green square moving left\na yellow square moving up\n"
EVAL_KEYS = {"samples", "size", "seconds"}
HAS_TENSORBOARD = (
    importlib.util.find_spec("tensorboard") is not None
)  # in the test extra; its checks are skipped without it
LOG_TO = "tensorboard" if HAS_TENSORBOARD else "none"


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


def write_shards(folder: Path, kind: str, samples: int, text_meta: dict) -> Path:
    """test_train's synthetic encoded samples (pixel "VAE", 8x8), whose metadata names real (tiny) text encoders."""
    folder.mkdir(parents=True)
    with ShardWriter(folder / f"{shard_name(0)}.tar") as writer:
        for i in range(samples):
            fields = sample_fields(i, kind)
            meta = json.loads(fields[schema.META])
            fields[schema.META] = schema.encode_json(meta | {"text": text_meta})
            writer.write(schema.make_key(kind, i), fields)
    write_empty_caption(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval-training")
    text = TextEncoders(
        clip=str(build_tiny_clip(root / "clip")), t5=str(build_tiny_t5(root / "t5", seed=1)), device="cpu"
    )
    inception = build_tiny_fid_inception(root / "pt_inception-tiny.pth")
    dim = load_fid_inception(inception).feature_dim
    rng = np.random.default_rng(0)
    a = rng.standard_normal((dim, dim))
    (root / "image_prompts.txt").write_text(IMAGE_PROMPTS)
    (root / "video_prompts.txt").write_text(VIDEO_PROMPTS)
    return {
        "images": write_shards(root / "images", "image", 6, text.metadata()),
        "videos": write_shards(root / "videos", "video", 6, text.metadata()),
        "clip": build_tiny_clip_model(
            root / "scorer", seed=5
        ),  # a seed whose cosines are positive: CLIP scores above 0
        "inception": inception,
        "reference": save_statistics(root / "reference.npz", GaussianStats(rng.standard_normal(dim), a @ a.T / dim)),
        "image_prompts": root / "image_prompts.txt",
        "video_prompts": root / "video_prompts.txt",
    }


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, value) for name, value in attrs if name in ("href", "src")]


def page_links(run: Path) -> list[tuple[str, str]]:
    """Every link and image source of RUN/index.html, each checked to be a relative path to an existing file or
    folder."""
    parser = Links()
    parser.feed((run / "index.html").read_text(encoding="utf-8"))
    for _, link in parser.links:
        assert not urlparse(link).scheme and not link.startswith("/"), link
        assert (run / unquote(link)).exists(), link
    return parser.links


def tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def eval_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval" in r]


def test_evaluation_tensorboard_and_run_page_of_a_t2i_run(tmp_path, setup):
    run = tmp_path / "run"
    result = run_cli(
        "train",
        "--image-data",
        setup["images"],
        "--out",
        run,
        "--model",
        TINY_SPEC,
        "--steps",
        4,
        "--global-batch",
        4,
        "--lr",
        "3e-3",
        "--num-workers",
        0,
        "--checkpoint-every",
        2,
        "--keep-checkpoints",
        1,
        "--log-every",
        1,
        "--ema-decay",
        "0.9",
        "--preview-every",
        2,
        "--preview-count",
        2,
        "--eval-every",
        2,
        "--eval-prompts",
        setup["image_prompts"],
        "--eval-clip",
        setup["clip"],
        "--eval-probe",
        "toy",
        "--eval-reference",
        setup["reference"],
        "--eval-inception",
        setup["inception"],
        "--eval-steps",
        3,
        "--log-to",
        LOG_TO,
    )
    assert result.exit_code == 0, result.output
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = eval_lines(run)
    assert [r["step"] for r in evals] == [2, 4] and all(set(r) == {"step", "eval"} for r in evals)
    for r in evals:
        e = r["eval"]
        assert set(e) == {"clip_score", "fid", "probe_color", "probe_place"} | EVAL_KEYS and e["samples"] == 2
        record = PipelineRecord.read(run / "model")
        assert e["size"] == f"{record.width}x{record.height}"  # sampled at the stated size: the training size
        assert 0 < e["clip_score"] <= 100 and np.isfinite(e["fid"]) and e["fid"] >= 0
        assert all(e[k] in (0.0, 0.5, 1.0) for k in ("probe_color", "probe_place"))  # rates over 2 samples
    assert [(r["step"], "eval" in r) for r in records] == [
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (4, False),
        (4, True),
    ]
    assert (run / "eval.png").stat().st_size > 1000

    # the samples are `gentron sample`'s, and `gentron eval` on them gives the logged numbers
    folder = run / "eval" / "step_0000004"
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step_0000004"]  # --keep-checkpoints 1
    result = run_cli("eval", folder, "--clip", setup["clip"], "--probe", "toy", "--out", tmp_path / "metrics.json")
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "metrics.json").read_text())
    assert measured["clip"]["score"] == pytest.approx(evals[-1]["eval"]["clip_score"], rel=1e-6)
    assert measured["probe"]["rates"] == {
        "color": evals[-1]["eval"]["probe_color"],
        "place": evals[-1]["eval"]["probe_place"],
    }
    result = run_cli(
        "sample",
        "--model",
        run,
        "--prompts",
        setup["image_prompts"],
        "--steps",
        3,
        "--cfg",
        "7.5",
        "--out",
        tmp_path / "s",
    )
    assert result.exit_code == 0, result.output

    def digests(f):
        return sorted(json.loads(p.read_text())["pixels_sha256"] for p in f.glob("*.json") if p.name != "metrics.json")

    assert digests(tmp_path / "s") == digests(folder) and len(digests(folder)) == 2

    # TensorBoard: the scalars of every logged step and evaluation, and the previews
    if HAS_TENSORBOARD:
        assert_tensorboard_events(tensorboard(run), records, evals)

    # the run page: every link resolves, and it shows the curves, previews, evaluation samples and models
    links = page_links(run)
    sources = {v for tag, v in links if tag == "img"}
    assert {"loss.png", "eval.png", "previews/step_0000004.png"} <= sources
    assert {f"eval/step_0000004/{p.name}" for p in folder.glob("*.png")} <= sources
    hrefs = {v for tag, v in links if tag == "a"}
    assert {
        "model/",
        "model_raw/",
        "config.json",
        "data_stats.json",
        "metrics.jsonl",
        "checkpoints/step_0000004/",
    } <= hrefs
    page = (run / "index.html").read_text()
    assert "a blue square in the bottom right" in page and "image number 0" in page  # eval prompts, preview captions
    assert not list(run.glob(".index.html*"))  # written atomically: no temporary file left


def assert_tensorboard_events(events, records: list[dict], evals: list[dict]) -> None:
    tags = events.Tags()
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "eval/clip_score",
        "eval/fid",
        "eval/probe_place",
    } <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([loss[s] for s in range(1, 5)], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/clip_score")] == [
        (r["step"], pytest.approx(r["eval"]["clip_score"], rel=1e-6)) for r in evals
    ]
    assert [e.step for e in events.Images("preview")] == [2, 4]


def test_a_killed_t2v_run_resumes_exactly_with_evaluation_on(tmp_path, setup, monkeypatch):
    """Killed right after the step-2 checkpoint, before its evaluation: the rerun evaluates step 2 first, then goes
    on; metrics.jsonl (losses and evaluations) and the TensorBoard curves equal those of the uninterrupted run."""
    cfg = TrainConfig(
        output=str(tmp_path / "whole"),
        stage="t2v",
        image_data=str(setup["images"]),
        video_data=str(setup["videos"]),
        model=TINY_SPEC,
        steps=4,
        global_batch=4,
        lr=3e-3,
        num_workers=0,
        checkpoint_every=2,
        log_every=1,
        ema_decay=0.9,
        p_motion_free=0.5,
        preview_every=4,
        preview_count=2,
        eval_every=2,
        eval_prompts=str(setup["video_prompts"]),
        eval_clip=str(setup["clip"]),
        eval_probe="toy",
        eval_steps=2,
        log_to=LOG_TO,
    )
    whole = train(cfg)
    evaluate = TrainingEvaluator.evaluate
    calls = []

    def killed_at_step_2(self, weights, step, **kwargs):
        calls.append(step)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return evaluate(self, weights, step, **kwargs)

    monkeypatch.setattr(TrainingEvaluator, "evaluate", killed_at_step_2)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**cfg.__dict__, "output": str(cut)}))
    assert not eval_lines(cut) and not (cut / "eval" / "step_0000002").exists()
    resumed = train(TrainConfig(**{**cfg.__dict__, "output": str(cut), "resume": True}))
    assert calls == [2, 2, 4] and resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)

    def lines(run):
        return [(r["step"], "eval" in r) for r in read_metrics(run / "metrics.jsonl")]

    assert lines(cut) == lines(whole.run_dir) == [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    for a, b in zip(read_metrics(cut / "metrics.jsonl"), read_metrics(whole.run_dir / "metrics.jsonl")):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        else:
            assert a["eval"]["size"] == b["eval"]["size"]
            values, expected = ({k: v for k, v in r["eval"].items() if k not in ("seconds", "size")} for r in (a, b))
            assert values == pytest.approx(expected, rel=1e-5)
            assert set(values) == {
                "clip_score",
                "temporal_consistency",
                "probe_color",
                "probe_direction",
                "probe_axis",
                "samples",
            }
            assert 0 < values["clip_score"] <= 100 and 0 <= values["temporal_consistency"] <= 1 + 1e-6
            assert all(0 <= values[k] <= 1 for k in ("probe_color", "probe_direction", "probe_axis"))
    if HAS_TENSORBOARD:
        events = tensorboard(cut)  # the killed process's events past its checkpoint are purged
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
        assert [e.step for e in events.Scalars("eval/probe_axis")] == [2, 4]
    links = page_links(cut)  # videos show as GIFs
    sources = {v for tag, v in links if tag == "img"}
    assert {"previews/step_0000004.gif", "eval.png"} <= sources
    assert any(v.startswith("eval/step_0000004/") and v.endswith(".gif") for v in sources)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-every", "2"], "--eval-every needs --eval-prompts FILE"),
        (["--eval-every", "2", "--eval-prompts", "{prompts}"], "--eval-every needs a metric"),
        (["--eval-clip", "{clip}"], "--eval-clip takes effect only with --eval-every N"),
        (
            ["--eval-every", "3", "--eval-prompts", "{prompts}", "--eval-probe", "toy"],
            "--eval-every 3 is not a multiple of --checkpoint-every 2",
        ),
        (
            ["--eval-every", "2", "--eval-prompts", "{prompts}", "--eval-reference", "{reference}"],
            "FID needs both --eval-reference and --eval-inception",
        ),
        (
            ["--eval-every", "2", "--eval-prompts", "{prompts}", "--eval-probe", "shapes"],
            "unknown --eval-probe 'shapes'",
        ),
        (["--log-to", "wandb"], "W&B is not supported"),
        (["--eval-every", "2", "--eval-prompts", "{missing}", "--eval-probe", "toy"], "prompts file not found"),
        (
            ["--eval-every", "2", "--eval-prompts", "{other}", "--eval-probe", "toy"],
            "--eval-probe toy scores toy captions only",
        ),
        (["--eval-every", "2", "--eval-prompts", "{prompts}", "--eval-clip", "{missing}"], "CLIP model not found"),
    ],
)
def test_options_that_cannot_take_effect_are_refused(tmp_path, setup, extra, message):
    (tmp_path / "other.txt").write_text("a photo of a cat\n")
    values = {
        "prompts": setup["image_prompts"],
        "clip": setup["clip"],
        "reference": setup["reference"],
        "missing": tmp_path / "missing",
        "other": tmp_path / "other.txt",
    }
    args = [
        "train",
        "--image-data",
        setup["images"],
        "--out",
        tmp_path / "run",
        "--model",
        TINY_SPEC,
        "--steps",
        2,
        "--global-batch",
        2,
        "--num-workers",
        0,
        "--checkpoint-every",
        2,
    ] + [str(a).format(**values) for a in extra]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_log_to_tensorboard_without_the_package_names_the_extra(tmp_path, setup, monkeypatch):
    find_spec = train_config.importlib.util.find_spec
    monkeypatch.setattr(
        train_config.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    result = run_cli(
        "train",
        "--image-data",
        setup["images"],
        "--out",
        tmp_path / "run",
        "--model",
        TINY_SPEC,
        "--steps",
        1,
        "--log-to",
        "tensorboard",
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "needs the tensorboard package" in text and ".[tensorboard]" in text


def test_previews_are_what_gentron_sample_makes_of_the_same_prompts(tmp_path):
    """Training previews and `gentron sample` share one generation core: the same model, captions, seeds and
    steps give the same pixels (previews sample the stored embeddings, sample encodes the captions itself)."""
    from PIL import Image

    from pipelines.encode.text import write_empty_caption as write_encoded_empty_caption
    from pipelines.sample.sampling import SampleConfig, sample

    root = tmp_path / "enc"
    text = TextEncoders(
        clip=str(build_tiny_clip(root / "clip")), t5=str(build_tiny_t5(root / "t5", seed=1)), device="cpu"
    )
    data = tmp_path / "images"
    data.mkdir()
    with ShardWriter(data / f"{shard_name(0)}.tar") as writer:
        for i in range(4):
            fields = sample_fields(i, "image")
            caption = schema.decode_caption(fields[schema.CAPTION])
            encoded = {schema.text_field(name): schema.encode_npy(a) for name, a in text.encode([caption])[0].items()}
            meta = json.loads(fields[schema.META]) | {"text": text.metadata()}
            writer.write(schema.make_key("image", i), fields | encoded | {schema.META: schema.encode_json(meta)})
    write_encoded_empty_caption(text, data)
    run = tmp_path / "run"
    train(
        TrainConfig(
            output=str(run),
            image_data=str(data),
            model=TINY_SPEC,
            steps=2,
            global_batch=4,
            checkpoint_every=2,
            preview_every=2,
            preview_count=2,
            preview_steps=3,
            preview_cfg=4.0,
            seed=3,
            flip=False,
        )
    )
    captions = [line.split(": ", 1)[1] for line in (run / "previews" / "prompts.txt").read_text().splitlines()]
    result = sample(
        SampleConfig(
            model=run,
            out=tmp_path / "samples",
            prompts=captions,
            steps=3,
            cfg_scale=4.0,
            seed=3,
            batch_size=2,
            device="cpu",
            grid=True,
        )
    )
    preview = np.asarray(Image.open(run / "previews" / "step_0000002.png").convert("RGB"))
    grid = np.asarray(Image.open(result.grid_files[0]).convert("RGB"))
    assert preview.shape == grid.shape and np.array_equal(preview, grid)


def test_evaluation_is_spread_over_ranks_and_equals_one_process(tmp_path, setup):
    """Under torchrun every rank samples its share of the evaluation prompts (whole batches, as one process forms
    them), rank 0 scores: the same samples, pixel for pixel, and the same metrics as one process."""
    import torch.multiprocessing as mp
    from train_data import free_port, rank_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(f"a {c} square in the {p}\n" for c in ("red", "blue") for p in ("top left", "bottom right"))
    )
    config = TrainConfig(
        image_data=str(setup["images"]),
        model=TINY_SPEC,
        steps=2,
        global_batch=4,
        num_workers=0,
        checkpoint_every=2,
        eval_every=2,
        eval_prompts=str(prompts),
        eval_probe="toy",
        eval_steps=2,
        output=str(tmp_path / "single"),
    )
    train(config)
    mp.spawn(rank_main, args=(2, free_port(), [replace(config, output=str(tmp_path / "ranks"))]), nprocs=2, join=True)
    single, ranks = (eval_lines(tmp_path / run) for run in ("single", "ranks"))
    assert len(single) == len(ranks) == 1 and single[0]["eval"]["samples"] == ranks[0]["eval"]["samples"] == 4
    drop = {"seconds"}
    assert {k: v for k, v in single[0]["eval"].items() if k not in drop} == {
        k: v for k, v in ranks[0]["eval"].items() if k not in drop
    }

    def pixels(run):
        folder = tmp_path / run / "eval" / "step_0000002"
        return {p.name: json.loads(p.read_text())["pixels_sha256"] for p in folder.glob("0*.json")}

    assert len(pixels("single")) == 4 and pixels("single") == pixels("ranks")
    assert not list((tmp_path / "ranks" / "eval").glob(".*"))  # the staging folder became step_0000002
