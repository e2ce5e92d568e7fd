"""`gentron train`: overfitting through the CLI, exact resume, T2I -> T2V init, bad data, NaN, checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import TINY_SPEC
from train_data import one_step_train_args, train_config, truncate, write_dataset
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.loader import StreamSpec, TrainStream, index_source, load_empty_caption
from pipelines.diffusion import make_objective
from pipelines.diffusion.gaussian import GaussianDiffusion
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer
from pipelines.progress import NullReporter
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig, recipe_settings
from pipelines.train.ema import EMA
from pipelines.train.metrics import read_metrics
from pipelines.train.run import batch_text
from pipelines.train.trainer import train

runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no path folded mid-word in the CLI's messages


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_dataset(root / "img", "image", samples=6, shards=2), write_dataset(
        root / "vid", "video", samples=6, shards=2
    )


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def test_t2i_overfits_through_the_cli_and_writes_a_complete_run(tmp_path, data):
    images, _ = data
    run = tmp_path / "t2i"
    args = [
        "train",
        "--stage",
        "t2i",
        "--image-data",
        str(images),
        "--out",
        str(run),
        "--model",
        '{"size": "T/2"}',
        "--steps",
        "60",
        "--global-batch",
        "6",
        "--lr",
        "3e-3",
        "--num-workers",
        "0",
        "--text-dropout",
        "0",
        "--checkpoint-every",
        "20",
        "--keep-checkpoints",
        "2",
        "--log-every",
        "1",
        "--ema-decay",
        "0.9",
        "--preview-every",
        "30",
        "--preview-count",
        "3",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    curve = [losses(run)[s] for s in range(1, 61)]
    assert np.mean(curve[-10:]) < 0.5 * np.mean(curve[:5]), curve
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000040", "step_0000060"]  # keeps 2
    for folder in ("model", "model_raw"):
        model = GenTronTransformer.from_pretrained(str(run / folder))
        assert not model.config.temporal
        pipeline = json.loads((run / folder / "pipeline.json").read_text())
        assert pipeline["vae"]["name"] == "pixel" and pipeline["vae"]["channels"] == 3
        assert (run / folder / schema.EMPTY_CAPTION_FILE).is_file()
    raw = GenTronTransformer.from_pretrained(str(run / "model_raw")).state_dict()
    ema = GenTronTransformer.from_pretrained(str(run / "model")).state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA is a different average
    assert (run / "loss.png").stat().st_size > 1000
    saved = TrainConfig.from_json(run / "config.json")
    assert saved.steps == 60 and saved.global_batch == 6 and saved.stage == "t2i"
    record = read_metrics(run / "metrics.jsonl")[-1]
    assert {"lr", "grad_norm", "samples_per_s", "memory_mb"} <= set(record)
    grid = np.asarray(Image.open(run / "previews" / "step_0000060.png"))
    assert grid.shape == (2 * 8 + 2, 2 * 8 + 2, 3) and grid[:8, :8].std() > 10  # 3 samples on a 2x2 grid, not blank
    assert (run / "previews" / "step_0000030.png").is_file()
    assert "image number" in (run / "previews" / "prompts.txt").read_text()
    # the stored run config repeats the run: here continued for two more steps
    result = runner.invoke(app, ["train", "--config", str(run / "config.json"), "--steps", "62"])
    assert result.exit_code == 0, result.output
    assert ckpt.latest_checkpoint(run).name == "step_0000062" and sorted(losses(run)) == list(range(1, 63))


def test_t2v_joint_training_overfits_through_the_cli(tmp_path, data):
    images, videos = data
    run = tmp_path / "t2v"
    args = [
        "train",
        "--stage",
        "t2v",
        "--image-data",
        str(images),
        "--video-data",
        str(videos),
        "--out",
        str(run),
        "--model",
        '{"size": "T/2"}',
        "--steps",
        "40",
        "--global-batch",
        "6",
        "--lr",
        "3e-3",
        "--num-workers",
        "0",
        "--text-dropout",
        "0",
        "--p-motion-free",
        "0.5",
        "--checkpoint-every",
        "40",
        "--log-every",
        "1",
        "--preview-every",
        "40",
        "--preview-count",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_metrics(run / "metrics.jsonl")
    curve = [r["loss"] for r in records]
    assert np.mean(curve[-8:]) < 0.6 * np.mean(curve[:4]), curve
    shares = [r["motion_free"] for r in records]
    assert 0.3 < np.mean(shares) < 0.7  # p = 0.5 over 240 samples
    model = GenTronTransformer.from_pretrained(str(run / "model"))
    assert model.config.temporal
    assert json.loads((run / "model" / "pipeline.json").read_text())["data"]["frames"] == 4
    strip = np.asarray(Image.open(run / "previews" / "step_0000040.png"))
    assert strip.shape == (2 * 8 + 2, 4 * 8 + 3 * 2, 3)  # one row per prompt, one column per frame
    gif = Image.open(run / "previews" / "step_0000040.gif")
    assert gif.n_frames == 4


class StopAt(NullReporter):
    """A reporter that presses Ctrl-C after `stop` training steps (the loop's own interrupt path)."""

    def __init__(self, stop: int):
        self.stop, self.steps = stop, 0

    @contextmanager
    def task(self, description, total, unit="it"):
        outer = self

        class Task:
            def advance(self, n=1, **fields):
                if "loss" in fields:
                    outer.steps += 1
                    if outer.steps == outer.stop:
                        raise KeyboardInterrupt

        yield Task()


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, data):
    images, videos = data
    cfg = train_config(
        tmp_path, images, stage="t2v", video_data=str(videos), steps=10, checkpoint_every=100, p_motion_free=0.5
    )
    whole = train(replace(cfg, output=str(tmp_path / "whole")))
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, output=str(tmp_path / "cut")), StopAt(4))
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_0000004"  # Ctrl-C saved the state
    resumed = train(replace(cfg, output=str(tmp_path / "cut"), resume=True))
    assert resumed.step == 10 and len(resumed.losses) == 6
    np.testing.assert_allclose(resumed.losses, whole.losses[4:], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    a = GenTronTransformer.from_pretrained(str(tmp_path / "whole" / "model")).state_dict()
    b = GenTronTransformer.from_pretrained(str(tmp_path / "cut" / "model")).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # EMA and optimizer state were restored


def test_the_ema_is_the_exponential_average_of_every_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema, decay = EMA(model, 0.9), 0.9
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().double()
    for n in expected:
        torch.testing.assert_close(ema.params[n].double(), expected[n], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema.params["0.weight"], model[0].weight)  # an average, not a copy


def test_a_cooldown_branched_from_a_checkpoint_equals_the_uninterrupted_decay_run(tmp_path, data):
    images, _ = data
    cfg = train_config(tmp_path, images, steps=8, checkpoint_every=100, lr_decay=0.5)
    whole = train(replace(cfg, output=str(tmp_path / "whole")))
    lrs = [m["lr"] for m in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert lrs == pytest.approx([cfg.lr] * 4 + [cfg.lr * (8 - s) / 4 for s in range(4, 8)])  # falls over the last 4
    train(replace(cfg, output=str(tmp_path / "branch"), steps=4, lr_decay=0.0))  # constant, a checkpoint at 4
    branched = train(replace(cfg, output=str(tmp_path / "branch"), resume=True))  # the decay begins where it left
    np.testing.assert_allclose(branched.losses, whole.losses[4:], rtol=1e-5, atol=1e-6)
    a = GenTronTransformer.from_pretrained(str(tmp_path / "whole" / "model")).state_dict()
    b = GenTronTransformer.from_pretrained(str(tmp_path / "branch" / "model")).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_decay_that_would_rewrite_steps_already_taken_is_refused(tmp_path, data):
    images, _ = data
    cfg = train_config(tmp_path, images, steps=4, checkpoint_every=100)
    train(cfg)
    with pytest.raises(GentronError) as err:  # over the last 6 of 8 steps: step 3 would have had 5/6 of the lr
        train(replace(cfg, steps=8, lr_decay=0.75, resume=True))
    assert "at step 4" in err.value.message and "step 3 would have been 0.0025, not 0.003" in err.value.message
    assert "--steps 4 --lr-decay 0.0" in err.value.hint


def test_a_run_folder_without_its_config_still_resumes(tmp_path, data):
    images, _ = data
    cfg = train_config(tmp_path, images, steps=4, checkpoint_every=100)
    train(cfg)
    (tmp_path / "run" / "config.json").unlink()  # nothing to compare the settings with: resume as asked
    assert train(replace(cfg, steps=6, resume=True)).step == 6


def test_t2v_from_t2i_starts_at_the_t2i_loss_on_pseudo_videos(tmp_path, data):
    images, _ = data
    t2i = train(train_config(tmp_path, images, output=str(tmp_path / "t2i"), steps=6, text_dropout=0.0))
    cfg = train_config(
        tmp_path,
        images,
        output=str(tmp_path / "t2v"),
        stage="t2v",
        init=str(t2i.run_dir / "model_raw"),
        steps=1,
        p_motion_free=1.0,
        frames=3,
        text_dropout=0.0,
    )
    first = train(cfg).losses[0]
    # the same first batch, through the T2I model frame by frame
    source = index_source(images, "image")
    empty, _ = load_empty_caption([images])
    spec = StreamSpec(
        stage="t2v",
        seed=cfg.seed,
        global_batch=cfg.global_batch,
        p_motion_free=1.0,
        text_dropout=0.0,
        frames=3,
        buffer_size=cfg.shuffle_buffer,
        text_fields=(schema.CLIP_POOLED, schema.CLIP_TOKENS, schema.T5_TOKENS),
    )
    stream = TrainStream(spec, source, None, empty, collate_text=TextCondition.collate)
    batch = stream.make_batch(0)
    assert bool(batch["pseudo_video"].all())
    model = GenTronTransformer.from_pretrained(str(t2i.run_dir / "model_raw"))
    b, t = batch["x0"].shape[:2]

    def flat(x):
        return x.reshape(b * t, *x.shape[2:])

    with torch.no_grad():
        per_frame = GaussianDiffusion().training_loss(
            model,
            flat(batch["x0"]),
            make_objective().timesteps(batch["timestep_draw"]).repeat_interleave(t),
            batch_text(batch).repeat_interleave(t),
            noise=flat(batch["noise"]),
        )["loss"]
    assert first == pytest.approx(float(per_frame.mean()), rel=1e-5)


def test_bad_data_is_skipped_and_counted_and_the_run_finishes(tmp_path):
    images = write_dataset(tmp_path / "bad", "image", samples=9, shards=3, bad={0: "wrong_shape", 4: "missing_field"})
    truncate(images / "000002.tar", 0.5)
    result = train(train_config(tmp_path, images, steps=3))
    assert result.step == 3 and result.skipped_samples >= 3
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())["image"]
    assert stats["skipped_by_reason"]["wrong_latent_shape"] == 1 and stats["skipped_by_reason"]["missing_field"] == 1
    assert stats["skipped_by_reason"]["bad_shard"] == 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["skipped_samples"] == result.skipped_samples


def test_nan_loss_stops_with_the_last_checkpoint_intact_or_is_skipped(tmp_path, monkeypatch):
    from pipelines.train.run import Run

    images = write_dataset(tmp_path / "data", "image", samples=16, shards=2)
    cfg = train_config(tmp_path, images, steps=12, checkpoint_every=1, keep_checkpoints=2, text_dropout=0.0)
    nan_step = 5  # the loss of this step diverges (NaN data no longer can: such samples are skipped when read)
    forward_backward = Run.forward_backward

    def diverging(self, batches):
        loss, grad_norm, motion_free, step_batch = forward_backward(self, batches)
        if self.step + 1 == nan_step:
            loss, grad_norm = float("nan"), float("nan")
        return loss, grad_norm, motion_free, step_batch

    monkeypatch.setattr(Run, "forward_backward", diverging)
    with pytest.raises(GentronError, match="loss became nan") as err:
        train(cfg)
    last = ckpt.latest_checkpoint(tmp_path / "run")
    assert last.name == ckpt.step_dir_name(nan_step - 1) and last.name in str(err.value)
    weights, _, _, state = ckpt.load_checkpoint(last)
    assert state["step"] == nan_step - 1 and all(torch.isfinite(w).all() for w in weights.values())
    assert len(ckpt.list_checkpoints(tmp_path / "run")) == min(2, nan_step - 1)
    skipped = train(replace(cfg, output=str(tmp_path / "skip"), on_nan="skip"))
    assert skipped.step == 12 and skipped.skipped_steps == 1 and np.isnan(skipped.losses[nan_step - 1])
    weights, _, _, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "skip"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_sample_is_skipped_and_named_while_the_rest_of_its_batch_trains(tmp_path):
    images = write_dataset(tmp_path / "nan", "image", samples=16, shards=2, bad={3: "nan"})
    logs = []

    class Log(NullReporter):
        def log(self, message):
            logs.append(message)

    for on_nan in ("stop", "skip"):
        out = tmp_path / on_nan
        result = train(
            train_config(tmp_path, images, output=str(out), steps=12, text_dropout=0.0, on_nan=on_nan), Log()
        )
        assert result.step == 12 and result.skipped_steps == 0 and all(np.isfinite(result.losses))
        stats = json.loads((out / "data_stats.json").read_text())["image"]
        assert [(f["shard"], f["key"], f["field"], f["reason"]) for f in stats["unreadable"]] == [
            ("000000.tar", "image_3", "latent_mean.npy", "non_finite")
        ]
        assert read_metrics(out / "metrics.jsonl")[-1]["unreadable_samples"] >= 1
    named = [m for m in logs if "image_3" in m]
    assert len(named) == 2 and "000000.tar" in named[0] and "non_finite" in named[0]  # once per run


def test_a_full_disk_while_saving_a_checkpoint_is_one_message(tmp_path, monkeypatch):
    """safetensors and torch.save report a full disk in their own exceptions, without an errno: while the file
    system is full, the failed save is the "disk full" message, and the previous checkpoint stays."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"w": torch.ones(2)}, {}, {"step": 1}, keep=3)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))
    with pytest.raises(GentronError) as err:
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"w": torch.zeros(2)}, {}, {"step": 2}, keep=1)
    assert "disk full while writing" in err.value.message and "step_0000002" in err.value.message
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    # with space left, the same failure is a bug of its own and keeps its type and traceback
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=1 << 20, f_frsize=4096))
    with pytest.raises(SafetensorError):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"w": torch.zeros(2)}, {}, {"step": 2}, keep=1)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(
        tmp_path, 1, {"w": torch.ones(2)}, {"w": torch.ones(2)}, {"x": torch.zeros(1)}, {"step": 1}, keep=3
    )

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"w": torch.zeros(2)}, {}, {"step": 2}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    weights, _, trainer, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(weights["w"], torch.ones(2)) and state == {"step": 1}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "Q/9"], "unknown model config"),
        (["--model", '{"size": "T/2", "patch_size": 3}'], "do not split into 3x3 patches"),
        (["--image-data", "/nonexistent/folder"], "not found"),
        (["--timestep-sampling", "cubic"], "unknown timestep sampling 'cubic'"),
        (
            ["--objective", "flow", "--model", '{"size": "T/2", "learn_sigma": true}'],
            "does not apply to rectified flow",
        ),
        (["--objective", "flow", "--loss-weighting", "min-snr"], "min-snr weights the epsilon loss"),
        (["--noise-shift", "big"], "is not none, auto or a number"),
        (["--objective", "edm"], "unknown objective 'edm'"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--lr", "-1e-4"], "--lr must be a positive number"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be positive, got 0"),
        (["--log-every", "0"], "--log-every must be positive, got 0"),
        (["--num-workers", "-1"], "--num-workers must be 0 or more, got -1"),
        (["--shuffle-buffer", "0"], "--shuffle-buffer must be positive, got 0"),
        (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1), got 1.0"),
        (["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1)"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be 0 (no clipping) or a positive norm"),
        (["--seed", str(2**64)], "--seed must be in [0, 2^63)"),
    ],
)
def test_user_errors_are_one_clear_message(tmp_path, data, extra, message):
    images, _ = data
    args = [
        "train",
        "--image-data",
        str(images),
        "--out",
        str(tmp_path / "r"),
        "--model",
        "T/2",
        "--steps",
        "1",
        "--global-batch",
        "2",
        "--num-workers",
        "0",
    ] + extra
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", "fast", "lr must be float, got 'fast'"),
        ("steps", 2.5, "steps must be int, got 2.5"),
        ("flip", "yes", "flip must be bool, got 'yes'"),
        ("image_data", 3, "image_data must be str or None, got 3"),
        ("checkpoint_every", 0, "--checkpoint-every must be positive, got 0"),
        ("ema_decay", 1.5, "--ema-decay must be in [0, 1), got 1.5"),
    ],
)
def test_a_config_json_with_wrong_types_or_values_is_one_clear_message(tmp_path, data, field, value, message):
    """--config RUN/config.json is checked as the options are: types when read, values by the same check()."""
    images, _ = data
    config = tmp_path / "config.json"
    config.write_text(json.dumps(asdict(train_config(tmp_path, images)) | {field: value}))
    result = runner.invoke(app, ["train", "--config", str(config)])
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2, result.output
    assert message in said and "Traceback" not in said


def test_max_grad_norm_zero_trains_without_clipping(tmp_path, data):
    """0 means no clipping (clip_grad_norm_ with 0 would zero every gradient): the same run with a norm far above the
    gradients' gives the same weights."""
    images, _ = data
    unclipped = train(train_config(tmp_path / "a", images, steps=2, checkpoint_every=1, max_grad_norm=0.0))
    loose = train(train_config(tmp_path / "b", images, steps=2, checkpoint_every=1, max_grad_norm=1e9))
    (first, a), (_, b) = (
        [ckpt.load_checkpoint(p)[0] for p in ckpt.list_checkpoints(r.run_dir)] for r in (unclipped, loose)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], first[k]) for k in a)  # the second step moved the weights


def test_the_objective_is_recorded_with_the_model(tmp_path, data):
    """Flow with an automatic noise shift: the exported model records the objective, the resolved shift and a
    diffusers scheduler config, and has no variance head."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.diffusion import noise_shift_for

    images, _ = data
    result = train(
        train_config(tmp_path, images, steps=2, objective="flow", timestep_sampling="logit-normal", noise_shift="auto")
    )
    model = result.run_dir / "model"
    record = json.loads((model / "pipeline.json").read_text())["objective"]
    latent_shape = json.loads((model / "pipeline.json").read_text())["data"]["latent_shape"]
    assert record["name"] == "flow" and record["timestep_sampling"] == "logit-normal"
    assert record["noise_shift"] == pytest.approx(noise_shift_for(tuple(latent_shape)))
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(model / "scheduler").config.shift == pytest.approx(
        record["noise_shift"]
    )
    assert json.loads((model / "config.json").read_text())["learn_sigma"] is False
    assert all(np.isfinite(result.losses))


def test_a_recipe_sets_its_settings_per_stage_and_options_beside_it_win(tmp_path, data):
    images, videos = data
    run = tmp_path / "recipe"
    common = ["--model", TINY_SPEC, "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "2"]
    args = ["train", "--recipe", "small-data", "--image-data", str(images), "--out", str(run), "--steps", "2"]
    result = runner.invoke(app, args + common + ["--global-batch", "4", "--lr", "5e-4"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    t2i = recipe_settings("small-data", "t2i")
    assert saved["recipe"] == "small-data" and saved["objective"] == "flow" and t2i["objective"] == "flow"
    assert {k: saved[k] for k in ("timestep_sampling", "noise_shift", "warmup_steps", "ema_decay")} == {
        "timestep_sampling": "logit-normal",
        "noise_shift": "auto",
        "warmup_steps": t2i["warmup_steps"],
        "ema_decay": t2i["ema_decay"],
    }
    assert saved["lr"] == 5e-4 and saved["global_batch"] == 4  # given beside the recipe: they win
    assert read_metrics(run / "metrics.jsonl")[0]["lr"] == pytest.approx(5e-4 / t2i["warmup_steps"])  # its warm-up
    assert json.loads((run / "model" / "pipeline.json").read_text())["objective"]["name"] == "flow"
    # the recorded settings repeat the run without naming the recipe again
    result = runner.invoke(app, ["train", "--config", str(run / "config.json"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert ckpt.latest_checkpoint(run).name == "step_0000003"
    # T2V gets the recipe's T2V settings; without a recipe the defaults stay the paper's
    t2v = TrainConfig.from_recipe("small-data", stage="t2v", video_data=str(videos), steps=5)
    assert t2v.p_motion_free == 0.25 and t2v.ema_decay == 0.9 and t2v.global_batch == 8 and t2v.steps == 5
    assert (t2v.lr, t2v.objective, t2v.recipe) == (recipe_settings("small-data", "t2v")["lr"], "flow", "small-data")
    paper = TrainConfig()
    assert (paper.objective, paper.timestep_sampling, paper.lr, paper.recipe) == ("ddpm", "uniform", 1e-4, None)
    result = runner.invoke(app, args[:-4] + ["--out", str(tmp_path / "x"), "--recipe", "big-data"] + common)
    assert result.exit_code == 2 and "unknown recipe 'big-data'" in result.output, result.output


def test_rerun_with_other_settings_is_refused(tmp_path, data):
    images, _ = data
    train(train_config(tmp_path, images, steps=2, checkpoint_every=2))
    with pytest.raises(GentronError, match="other settings"):
        train(train_config(tmp_path, images, steps=4, lr=1e-2))
    assert train(train_config(tmp_path, images, steps=4)).step == 4  # more steps: continues


def test_activation_checkpointing_gives_the_same_losses(tmp_path, data):
    images, _ = data
    plain = train(train_config(tmp_path, images, output=str(tmp_path / "plain"), steps=3))
    recomputed = train(
        train_config(tmp_path, images, output=str(tmp_path / "gc"), steps=3, gradient_checkpointing=True)
    )
    np.testing.assert_allclose(recomputed.losses, plain.losses, rtol=1e-5)


def test_sigterm_finishes_the_step_saves_and_exits_143_then_the_rerun_continues_exactly(tmp_path, data):
    """What Slurm and Kubernetes send before SIGKILL: the step in flight completes, a checkpoint of it is saved
    (not the last periodic one), one line says so, the exit code is 143, and the same command continues."""
    images, _ = data
    run = tmp_path / "preempted"
    args = ["train", "--image-data", str(images), "--out", str(run), "--model", TINY_SPEC, "--steps", "40"]
    args += ["--global-batch", "4", "--lr", "3e-3", "--num-workers", "0", "--checkpoint-every", "1000"]
    args += ["--log-every", "1", "--ema-decay", "0.9"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gentron_cli.main", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # polling for the run's own progress: training has started
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, output[-2000:]
    saved = ckpt.latest_checkpoint(run)
    assert saved is not None and saved.name != "step_0000040", output[-2000:]  # a mid-run checkpoint
    assert "preempted:" in output and f"at step {int(saved.name[5:])} of 40" in output and "Traceback" not in output
    assert json.loads((run / "model" / "pipeline.json").read_text())["step"] == int(saved.name[5:])
    result = runner.invoke(app, args)  # the same command: resumes
    assert result.exit_code == 0, result.output
    whole = train(
        train_config(tmp_path, images, output=str(tmp_path / "whole"), model=TINY_SPEC, steps=40, checkpoint_every=40)
    )
    logged = losses(run)
    assert sorted(logged) == list(range(1, 41))
    np.testing.assert_allclose([logged[s] for s in range(1, 41)], whole.losses, rtol=1e-5, atol=1e-6)


def test_a_kill_during_the_final_export_is_repaired_by_the_rerun(tmp_path, data):
    """The last checkpoint is saved before model/ is exported: a kill between leaves model/ at an earlier step (or
    half a temporary folder). The rerun has nothing to train, exports the checkpoint's step again and cleans up."""
    images, _ = data
    cfg = train_config(tmp_path, images, steps=4, checkpoint_every=2)
    train(cfg)
    run = Path(cfg.output)
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    stale = train(replace(cfg, output=str(tmp_path / "stale"), steps=2))  # model/ as the export of step 2 left it
    shutil.rmtree(run / "model")
    shutil.copytree(stale.run_dir / "model", run / "model")
    shutil.rmtree(run / "model_raw")  # never written
    (run / ".model_raw.tmp-999999").mkdir()  # a kill mid-export leaves its temporary folder
    assert json.loads((run / "model" / "pipeline.json").read_text())["step"] == 2
    result = runner.invoke(app, ["train", "--config", str(run / "config.json")])
    assert result.exit_code == 0, result.output
    assert "lagged the checkpoint of step 4" in " ".join(result.output.split())
    for name, weights in (("model", last[1]), ("model_raw", last[0])):
        assert json.loads((run / name / "pipeline.json").read_text())["step"] == 4
        exported = load_file(str(run / name / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(exported[k], weights[k].to(exported[k].dtype)) for k in weights)
    assert not list(run.glob(".model*"))


def test_config_json_from_another_folder_continues_the_same_run(tmp_path, data, monkeypatch):
    """RUN/config.json records the run folder as an absolute path: `--config` from any working directory continues
    that run instead of starting a new one where the relative path would point."""
    images, _ = data
    monkeypatch.chdir(tmp_path)
    train(train_config(tmp_path, images, output="relative-run", steps=2))
    assert json.loads((tmp_path / "relative-run" / "config.json").read_text())["output"] == str(
        tmp_path / "relative-run"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "relative-run" / "config.json"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert ckpt.latest_checkpoint(tmp_path / "relative-run").name == "step_0000003"
    assert not (elsewhere / "relative-run").exists()


def test_sigkill_then_rerun_continues_exactly(tmp_path, data):
    """A real `kill -9` of a `gentron train` process, then the same command again."""
    images, _ = data
    run = tmp_path / "killed"
    args = [
        "train",
        "--image-data",
        str(images),
        "--out",
        str(run),
        "--model",
        TINY_SPEC,
        "--steps",
        "80",
        "--global-batch",
        "4",
        "--lr",
        "3e-3",
        "--num-workers",
        "0",
        "--checkpoint-every",
        "5",
        "--log-every",
        "1",
        "--ema-decay",
        "0.9",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gentron_cli.main", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(run) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = ckpt.latest_checkpoint(run)
    assert killed_at is not None and killed_at.name != "step_0000080"  # killed mid-run
    result = runner.invoke(app, args)  # the same command: resumes
    assert result.exit_code == 0, result.output
    whole = train(
        train_config(tmp_path, images, output=str(tmp_path / "whole"), model=TINY_SPEC, steps=80, checkpoint_every=80)
    )
    logged = losses(run)
    assert sorted(logged) == list(range(1, 81))
    np.testing.assert_allclose([logged[s] for s in range(1, 81)], whole.losses, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- refused or announced settings


class _Log(NullReporter):
    """A reporter that keeps the stage's messages."""

    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_resuming_onto_a_checkpoint_of_another_model_size_is_refused(tmp_path, tiny_run):
    import shutil

    from pipelines.train.trainer import train

    images, run = tiny_run
    shutil.copytree(run / "checkpoints", tmp_path / "run" / "checkpoints")  # a T/2 width-32 checkpoint
    wider = '{"size": "T/2", "depth": 2, "hidden_size": 64, "mlp_dim": 64}'
    with pytest.raises(GentronError) as err:
        train(train_config(tmp_path, images, model=wider, steps=4, checkpoint_every=2))
    assert "checkpoint" in err.value.message and "do not match the model config" in err.value.message


def test_init_accepts_a_run_folder_and_records_the_model_trained(tmp_path, tiny_run):
    from pipelines.train.trainer import train

    images, run = tiny_run
    result = train(train_config(tmp_path, images, steps=2, model=None, init=str(run)))
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert recorded["init"] == str((run / "model").resolve())
    assert json.loads(recorded["model"])["hidden_size"] == 32 and json.loads(recorded["model"])["depth"] == 2


def test_a_model_that_disagrees_with_the_init_model_is_refused(tmp_path, tiny_run):
    images, run = tiny_run
    args = one_step_train_args(images, tmp_path / "r", "--init", str(run), "--model", "XL/2")
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "disagrees with the --init model" in result.output and "depth 28" in result.output


def test_flip_without_mirrored_latents_is_said_once_and_recorded_and_t2v_on_stills_warns(tmp_path, tiny_run):
    from pipelines.train.trainer import train

    images, _ = tiny_run
    log = _Log()
    result = train(train_config(tmp_path, images, steps=2, checkpoint_every=2, flip=True), log)
    said = [m for m in log.lines if "--flip" in m]
    assert len(said) == 1 and "encode-latents --flip" in said[0]
    assert json.loads((result.run_dir / "config.json").read_text())["flip"] is False

    log = _Log()
    train(
        train_config(
            tmp_path, images, steps=2, checkpoint_every=2, output=str(tmp_path / "t2v"), stage="t2v", frames=2
        ),
        log,
    )
    assert any("motion cannot be learnt from stills" in m for m in log.lines)


def test_a_second_train_into_a_run_folder_is_refused_naming_the_holder(tmp_path, tiny_run):
    from pipelines.locking import folder_lock

    images, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run):
        args = one_step_train_args(images, run, "--model", TINY_SPEC)
        result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(run) in result.output and f"process {os.getpid()}" in result.output
