"""Training with given frames (`gentron train --condition-frames`): the per-sample draws, the start at the T2V
model, exact resume, images as stills and motion-free samples, the record and the refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import losses
from tiny import TINY_SPEC as TINY
from tiny import LogLines
from train_data import train_config, write_buckets, write_dataset
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.loader import (
    ConditionSpec,
    StreamSpec,
    TrainStream,
    condition_draw,
    index_source,
    load_empty_caption,
)
from pipelines.diffusion import make_objective
from pipelines.errors import GentronError
from pipelines.model.conditioning import FrameCondition, TextCondition
from pipelines.model.gentron import GenTronTransformer
from pipelines.model_folder import ModelFolder
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig
from pipelines.train.run import batch_frames, batch_text
from pipelines.train.setup import check_condition_frames
from pipelines.train.trainer import train

runner = CliRunner()
TEXT_FIELDS = (schema.CLIP_POOLED, schema.CLIP_TOKENS, schema.T5_TOKENS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    return (
        write_dataset(root / "img", "image", samples=6, shards=2),
        write_dataset(root / "vid", "video", samples=6, shards=2, frames=6),
    )


def stream_of(images, videos, condition: ConditionSpec, batch: int = 8, p_motion_free: float = 0.0, start_step=0):
    sources = [None if f is None else index_source(f, kind) for f, kind in ((images, "image"), (videos, "video"))]
    empty, _ = load_empty_caption([f for f in (images, videos) if f is not None])
    spec = StreamSpec(
        stage="t2v",
        seed=3,
        global_batch=batch,
        p_motion_free=p_motion_free,
        frames=5,
        text_fields=TEXT_FIELDS,
        condition=condition,
    )
    return TrainStream(spec, *sources, empty, start_step, collate_text=TextCondition.collate)


def first_batch(stream: TrainStream) -> dict:
    return stream.make_batch(stream.start_step)


# ----------------------------------------------------------------------------- the draws


@pytest.mark.parametrize("frames", ["first", "prefix", "first-last"])
def test_condition_draws_give_the_asked_frames_hide_some_and_never_move_on_resume(data, frames):
    images, videos = data
    spec = ConditionSpec(frames=frames, p=0.7, dropout=0.3, noise=0.2)
    stream = stream_of(None, videos, spec, batch=64)
    batch = first_batch(stream)
    x0, shown, loss_frames = batch["x0"], batch["condition_mask"], batch["loss_frames"]
    drawn = ~loss_frames
    given_rows = drawn.any(dim=1)
    # about p of the samples are given frames, about `dropout` of those are hidden; the rest train on every frame
    assert 0.5 < given_rows.float().mean() < 0.9
    hidden = given_rows & ~shown.any(dim=1)
    assert 0.1 < hidden.sum() / given_rows.sum() < 0.5
    assert torch.equal(shown, drawn & ~hidden[:, None])
    for row in drawn[given_rows]:
        picked = torch.nonzero(row).flatten().tolist()
        if frames == "first":
            assert picked == [0]
        elif frames == "first-last":
            assert picked == [0, x0.shape[1] - 1]
        else:
            assert picked == list(range(len(picked))) and 1 <= len(picked) <= 3  # k from 1 to half of 6 latent frames
    if frames == "prefix":
        assert {int(r.sum()) for r in drawn[given_rows]} == {1, 2, 3}
    # the given latents: x0 plus noise of std below 0.2 at the shown frames, zeros elsewhere
    latents = batch["condition_latents"]
    assert torch.count_nonzero(latents[~shown]) == 0
    offset = (latents - x0)[shown]
    assert 0 < offset.std() < 0.2
    # each sample's draw depends on the seed and its index only: a stream started later draws the same
    later = stream_of(None, videos, spec, batch=8, start_step=5)  # samples 40 .. 47
    again = first_batch(later)
    for key in ("condition_mask", "condition_latents", "loss_frames"):
        assert torch.equal(again[key], batch[key][40:48]), key
    # and it is what condition_draw says
    given, was_hidden, level = condition_draw(spec, 3, 41, x0.shape[1])
    assert np.array_equal(given, drawn[41].numpy()) and was_hidden == bool(hidden[41])
    assert (level > 0) == bool(given.any()) and level < 0.2


def test_stills_and_one_frame_images_are_given_frames_only_when_frames_are_left(data):
    images, videos = data
    spec = ConditionSpec(frames="first", p=1.0)
    batch = first_batch(stream_of(images, videos, spec, p_motion_free=0.5))
    still = batch["pseudo_video"]
    assert still.any() and (~still).any()
    assert bool(batch["condition_mask"][:, 0].all()) and not batch["condition_mask"][:, 1:].any()
    # a still is given its first frame, which its other frames repeat exactly
    x0 = batch["x0"][still]
    assert torch.equal(batch["condition_latents"][still][:, 0], x0[:, 0])
    assert torch.equal(x0[:, 1:], x0[:, :1].expand_as(x0[:, 1:]))
    # a clip too short to leave frames to generate is given none
    given, _, _ = condition_draw(ConditionSpec(frames="first-last", p=1.0), 0, 0, 2)
    assert not given.any()
    given, _, _ = condition_draw(ConditionSpec(frames="first", p=1.0), 0, 0, 1)
    assert not given.any()


def test_bucketed_batches_are_given_frames_at_their_own_bucket_and_short_buckets_none(tmp_path):
    # clips of two buckets: 8x8 with 4 latent frames, 8x16 with 2 (too few for first-last: nothing left to generate)
    videos = write_buckets(tmp_path / "vid", "video", [(8, 8, 8, 4), (8, 8, 16, 2)])
    spec = ConditionSpec(frames="first-last", p=1.0)
    stream = stream_of(None, videos, spec, batch=4)
    seen = set()
    for step in range(12):
        batch = stream.make_batch(step)
        x0, shown, loss_frames = batch["x0"], batch["condition_mask"], batch["loss_frames"]
        frames = x0.shape[1]
        seen.add(frames)
        assert shown.shape == loss_frames.shape == x0.shape[:2] and batch["condition_latents"].shape == x0.shape
        if frames == 4:  # every sample given its first and last latent frame, the loss on the two between
            assert shown[:, [0, 3]].all() and not shown[:, 1:3].any()
            assert torch.equal(loss_frames, ~shown)
            assert torch.equal(batch["condition_latents"][:, [0, 3]], x0[:, [0, 3]])
        else:  # a 2-frame bucket is given nothing and trains text-to-video on every frame
            assert not shown.any() and loss_frames.all() and not batch["condition_latents"].any()
    assert seen == {2, 4}


def test_condition_frames_are_refused_when_no_bucket_has_frames_to_spare_and_announced_for_short_ones():
    config = TrainConfig(stage="t2v", condition_frames="first-last")
    log = LogLines()
    check_condition_frames(config, [(4, 3, 8, 8), (2, 3, 8, 16)], log)
    assert len(log.lines) == 1 and "(2, 3, 8, 16)" in log.lines[0] and "given no frames" in log.lines[0]
    check_condition_frames(config, [(4, 3, 8, 8)], log)
    assert len(log.lines) == 1  # nothing to say when every bucket has frames to spare
    with pytest.raises(GentronError, match="nothing would be left to generate"):
        check_condition_frames(config, [(2, 3, 8, 8), (2, 3, 8, 16)], log)
    check_condition_frames(TrainConfig(stage="t2v"), [(1, 3, 8, 8)], log)  # no conditioning: nothing to check


# ----------------------------------------------------------------------------- training


def test_image_to_video_training_starts_at_the_t2v_model_and_learns(tmp_path, data):
    images, videos = data
    t2v = train(
        train_config(tmp_path, images, output=str(tmp_path / "t2v"), stage="t2v", video_data=str(videos), steps=4)
    )
    cfg = train_config(
        tmp_path,
        images,
        output=str(tmp_path / "i2v"),
        stage="t2v",
        video_data=str(videos),
        init=str(t2v.run_dir / "model_raw"),
        steps=1,
        text_dropout=0.0,
        p_motion_free=0.0,
        condition_frames="first",
        p_condition=1.0,
    )
    first = train(cfg).losses[0]
    # the same first batch through the T2V model, its loss over the frames after the first
    source = index_source(videos, "video")
    empty, _ = load_empty_caption([videos])
    spec = StreamSpec(
        stage="t2v",
        seed=cfg.seed,
        global_batch=cfg.global_batch,
        text_dropout=0.0,
        buffer_size=cfg.shuffle_buffer,
        text_fields=TEXT_FIELDS,
        condition=cfg.condition_spec(),
    )
    stream = TrainStream(spec, None, source, empty, collate_text=TextCondition.collate)
    batch = stream.make_batch(0)
    assert bool(batch["condition_mask"][:, 0].all()) and not batch["condition_mask"][:, 1:].any()
    model = GenTronTransformer.from_pretrained(str(t2v.run_dir / "model_raw"))
    objective = make_objective()
    with torch.no_grad():
        out = objective.diffusion.training_loss(
            model,
            batch["x0"],
            objective.timesteps(batch["timestep_draw"]),
            batch_text(batch),
            noise=batch["noise"],
        )
        # the per-frame losses of the T2V model, averaged over frames 1.. by hand (learned sigma: mse + vlb)
        output = model(
            objective.noised(batch["x0"], batch["noise"], objective.timesteps(batch["timestep_draw"])),
            objective.timesteps(batch["timestep_draw"]),
            batch_text(batch),
        )
        mse = ((batch["noise"] - output[:, :, :3]) ** 2)[:, 1:].flatten(1).mean(1)
        frames = batch_frames(batch)
        masked = objective.loss(
            model,
            batch["x0"],
            objective.timesteps(batch["timestep_draw"]),
            batch_text(batch),
            noise=batch["noise"],
            loss_frames=frames["loss_frames"],  # the T2V model reads no frames: it is what the I2V model starts as
        )
    torch.testing.assert_close(masked["mse"], mse)
    assert first == pytest.approx(float(masked["loss"].mean()), rel=1e-5)
    assert first != pytest.approx(float(out["loss"].mean()), rel=1e-3)  # the first frame is not in the loss
    # the exported model is frame-conditioned and records how it was trained
    folder = ModelFolder(tmp_path / "i2v")
    assert folder.config["frame_conditioning"] is True
    record = folder.record.conditioning
    assert (record.frames, record.p, record.dropout, record.noise) == ("first", 1.0, 0.0, 0.0)
    # it learns: a few more steps on the same data lower the loss
    more = train(replace(cfg, output=str(tmp_path / "i2v-more"), steps=30, lr=3e-3))
    assert np.mean(more.losses[-5:]) < np.mean(more.losses[:5])


def test_interrupted_and_resumed_conditioned_run_equals_the_uninterrupted_one(tmp_path, data):
    from test_train import StopAt

    images, videos = data
    cfg = train_config(
        tmp_path,
        images,
        stage="t2v",
        video_data=str(videos),
        steps=8,
        checkpoint_every=100,
        p_motion_free=0.5,
        condition_frames="prefix",
        p_condition=0.6,
        condition_dropout=0.3,
        condition_noise=0.1,
    )
    whole = train(replace(cfg, output=str(tmp_path / "whole")))
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, output=str(tmp_path / "cut")), StopAt(3))
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_0000003"
    resumed = train(replace(cfg, output=str(tmp_path / "cut"), resume=True))
    np.testing.assert_allclose(resumed.losses, whole.losses[3:], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    # the settings are part of the run: another dropout is refused on resume
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(tmp_path / "cut" / "config.json"),
            "--condition-dropout",
            "0.5",
            "--steps",
            "9",
        ],
    )
    assert result.exit_code == 2 and "condition_dropout" in result.output


def test_a_fresh_conditioned_model_trains_from_the_data_alone(tmp_path, data):
    images, videos = data
    run = train(
        train_config(
            tmp_path,
            images,
            stage="t2v",
            video_data=str(videos),
            steps=2,
            condition_frames="first-last",
        )
    )
    folder = ModelFolder(run.run_dir)
    assert folder.config["frame_conditioning"] is True
    assert folder.record.conditioning.frames == "first-last" and folder.record.conditioning.p == 0.9
    model = folder.load_model()
    x = torch.randn(1, 6, 3, 8, 8)
    frames = FrameCondition.given(torch.randn_like(x), torch.tensor([[True, False, False, False, False, True]]))
    text = TextCondition.collate([{k: v for k, v in load_empty_caption([videos])[0].items()}])
    assert model(x, torch.tensor([5]), text, frames=frames).shape == (1, 6, 6, 8, 8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--p-condition", "0.5"], "--p-condition takes effect only with --condition-frames"),
        (["--condition-noise", "0.1", "--condition-dropout", "0.1"], "take effect only with --condition-frames"),
        (["--condition-frames", "middle"], "unknown --condition-frames 'middle'"),
        (["--condition-frames", "first", "--stage", "t2v", "--p-condition", "1.5"], "--p-condition must be in [0, 1]"),
        (["--condition-frames", "first", "--stage", "t2v", "--condition-noise", "-1"], "must be 0 or more"),
        (["--condition-frames", "first", "--stage", "t2i"], "but --stage is t2i"),
        (["--condition-frames", "first-last", "--stage", "t2v", "--frames", "2"], "nothing would be left to generate"),
    ],
)
def test_conditioning_settings_that_cannot_take_effect_are_refused(tmp_path, data, extra, message):
    images, _ = data
    args = ["train", "--image-data", str(images), "--out", str(tmp_path / "r"), "--model", TINY, "--steps", "1"]
    result = runner.invoke(app, args + ["--global-batch", "2", "--num-workers", "0", *extra])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert message in said and "Traceback" not in said
