"""Training and sampling with buckets: a killed bucketed run resumes exactly, the bucket table reaches
data_stats.json, the run page, TensorBoard and pipeline.json, token batches refuse a resume that would change
them, joint image/video training over sizes and lengths, and sampling at sizes other than the training one."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_train import StopAt, losses
from train_data import train_config, write_buckets
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.errors import GentronError
from pipelines.model_folder import PipelineRecord
from pipelines.sample.sampling import SampleConfig, sample
from pipelines.train import checkpoint as ckpt
from pipelines.train.trainer import train


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket_train")
    # (count, height, width, frames): square, wide (16x8) and tall (8x16) latents
    images = write_buckets(root / "img", "image", [(8, 8, 8, 1), (8, 8, 16, 1), (6, 16, 8, 1)])
    videos = write_buckets(root / "vid", "video", [(6, 8, 8, 4), (6, 8, 16, 2)], first=100)
    return images, videos


def test_a_killed_bucketed_run_resumes_exactly_and_reports_its_buckets(tmp_path, mixed):
    images, _ = mixed
    cfg = train_config(tmp_path, images, checkpoint_every=100, log_to="tensorboard")
    from tiny import LogLines

    log = LogLines()
    whole = train(replace(cfg, output=str(tmp_path / "whole")), log)
    # 8x16 and 16x8 latents hold twice the 8x8 ones' tokens at the same fixed batch: said once, at the start
    assert [line for line in log.lines if "--bucket-batch tokens" in line] == [
        "note: with --bucket-batch fixed a step of 8x8 latents trains on 50% of the tokens of a step of 16x8 latents; "
        "--bucket-batch tokens scales each bucket's batch so every step holds about the same tokens"
    ]
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, output=str(tmp_path / "cut")), StopAt(3))
    resumed = train(replace(cfg, output=str(tmp_path / "cut"), resume=True))
    assert resumed.step == 8 and len(resumed.losses) == 5
    np.testing.assert_allclose(resumed.losses, whole.losses[3:], rtol=1e-5, atol=1e-6)  # every step after the kill
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    run = tmp_path / "whole"
    table = json.loads((run / "data_stats.json").read_text())["buckets"]
    assert [r["shape"] for r in table["buckets"]] == [[3, 8, 8], [3, 8, 16], [3, 16, 8]]
    assert [(r["images"], r["batch"]) for r in table["buckets"]] == [(8, 4), (8, 4), (6, 4)]
    assert json.loads((run / "model" / "pipeline.json").read_text())["data"]["buckets"] == [
        [3, 8, 8],
        [3, 8, 16],
        [3, 16, 8],
    ]
    page = (run / "index.html").read_text()
    assert "<h3>Buckets" in page and "16x8" in page and "8x16" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("data/buckets/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| 16x8 |" in text and "| 8x16 |" in text


def test_token_batches_refuse_a_resume_that_would_change_them(tmp_path):
    images = write_buckets(tmp_path / "img", "image", [(10, 8, 8, 1), (6, 8, 16, 1)])
    cfg = train_config(tmp_path, images, checkpoint_every=100, bucket_batch="tokens", global_batch=6, steps=2)
    first = train(cfg)
    table = json.loads((tmp_path / "run" / "data_stats.json").read_text())["buckets"]
    batches = {tuple(r["shape"]): r["batch"] for r in table["buckets"]}
    assert batches == {(3, 8, 8): 6, (3, 8, 16): 3}  # twice the tokens: half the batch
    assert first.step == 2
    with pytest.raises(GentronError, match="was trained with buckets"):
        train(replace(cfg, steps=4, grad_accum=2))  # batches in multiples of 2: 8x16 would draw 4
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_0000002"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny text encoders of the data's width (the shards name placeholders: sampling is given these instead)."""
    from pipelines.model.tiny import build_tiny_clip, build_tiny_t5

    root = tmp_path_factory.mktemp("encoders")
    return {"clip": str(build_tiny_clip(root / "clip", seed=0)), "t5": str(build_tiny_t5(root / "t5", seed=1))}


def test_joint_bucketed_t2v_trains_and_samples_at_any_size(tmp_path, mixed, encoders):
    images, videos = mixed
    t2v = train(
        train_config(
            tmp_path,
            images,
            checkpoint_every=100,
            stage="t2v",
            video_data=str(videos),
            p_motion_free=0.5,
            steps=4,
            global_batch=4,
        )
    )
    assert t2v.step == 4 and all(np.isfinite(t2v.losses))
    record = PipelineRecord.read(t2v.run_dir / "model")
    assert sorted(record.trained_sizes) == [(2, 8, 16), (4, 8, 8)]  # (frames, height, width): clip buckets only
    out = tmp_path / "samples"
    result = sample(
        SampleConfig(
            model=t2v.run_dir,
            out=out,
            prompts=["a wide clip"],
            steps=2,
            width=16,
            height=8,
            frames=3,
            text_encoders=encoders,
        )
    )
    sidecar = json.loads(result.samples[0].sidecar.read_text())
    assert (sidecar["settings"]["width"], sidecar["settings"]["height"], sidecar["settings"]["frames"]) == (16, 8, 3)
    strip = next(f for f in result.samples[0].files if f.name.endswith(".frames.png"))
    assert Image.open(strip).size == (3 * 16, 8)  # three frames of 16 x 8, side by side
    runner = CliRunner()
    again = runner.invoke(app, ["sample", "--from-sidecar", str(result.samples[0].sidecar), "--out", str(tmp_path)])
    assert again.exit_code == 0 and "pixels identical" in again.output
    # default: the training size of the main bucket
    default = sample(
        SampleConfig(model=t2v.run_dir, out=tmp_path / "d", prompts=["x"], steps=1, text_encoders=encoders)
    )
    assert (default.settings["width"], default.settings["height"], default.settings["frames"]) == (
        record.width,
        record.height,
        record.data.frames,
    )
    bad = runner.invoke(
        app, ["sample", "--model", str(t2v.run_dir), "--out", str(tmp_path / "x"), "--prompt", "x", "--width", "15"]
    )
    message = " ".join(bad.output.split())
    assert bad.exit_code == 2 and "do not split into 2x2 patches" in message and "width 16" in message
    both = runner.invoke(
        app,
        ["sample", "--model", str(t2v.run_dir), "--out", str(tmp_path / "y"), "--prompt", "x", "--resolution", "8"]
        + ["--width", "16"],
    )
    assert both.exit_code == 2 and "--resolution" in both.output


def test_a_new_sincos_model_on_several_grids_is_told_of_relative_positions_once():
    from tiny import LogLines

    from pipelines.train.config import TrainConfig
    from pipelines.train.setup import suggest_relative_positions

    log, grids = LogLines(), [(3, 8, 8), (3, 8, 16), (3, 16, 8)]
    suggest_relative_positions(TrainConfig(), {"position_encoding": "sincos"}, grids, log)
    assert len(log.lines) == 1 and "3 latent grids (8x8, 16x8, 8x16)" in log.lines[0] and "sincos+rope" in log.lines[0]
    # nothing to say: the model already has them, one grid only (frame counts aside), or an --init model's choice
    suggest_relative_positions(TrainConfig(), {"position_encoding": "sincos+rope"}, grids, log)
    suggest_relative_positions(TrainConfig(), {"position_encoding": "sincos"}, [(4, 3, 8, 8), (2, 3, 8, 8)], log)
    suggest_relative_positions(TrainConfig(init="t2i/model"), {"position_encoding": "sincos"}, grids, log)
    assert len(log.lines) == 1


def test_fixed_batches_on_buckets_of_very_different_tokens_are_told_of_token_batches_once():
    from tiny import LogLines

    from pipelines.train.config import TrainConfig
    from pipelines.train.setup import suggest_token_batches

    def table(*shapes):  # the plan's table as the trainer has it: latent width x height and frames per bucket
        rows = [{"shape": list(s), "latent": f"{s[-1]}x{s[-2]}", "frames": s[0] if len(s) == 4 else 1} for s in shapes]
        return {"buckets": rows}

    log, clips = LogLines(), table((8, 4, 16, 16), (4, 4, 16, 16), (2, 4, 16, 16))
    suggest_token_batches(TrainConfig(), clips, log)  # 2-frame clips: a quarter of an 8-frame step's tokens
    assert log.lines == [
        "note: with --bucket-batch fixed a step of 16x16 latents x 2 frames trains on 25% of the tokens of a step of "
        "16x16 latents x 8 frames; --bucket-batch tokens scales each bucket's batch so every step holds about the same "
        "tokens"
    ]
    # nothing to say: tokens batches already, one bucket, or aspect buckets of about one budget (64 against 72 tokens)
    suggest_token_batches(TrainConfig(bucket_batch="tokens"), clips, log)
    suggest_token_batches(TrainConfig(), table((4, 16, 16)), log)
    suggest_token_batches(TrainConfig(), table((4, 16, 16), (4, 12, 24), (4, 24, 12)), log)
    assert len(log.lines) == 1
    suggest_token_batches(TrainConfig(), table((4, 16, 16), (4, 32, 32)), log)  # two resolutions: told
    assert len(log.lines) == 2 and "25% of the tokens" in log.lines[1] and "of 16x16 latents trains" in log.lines[1]
