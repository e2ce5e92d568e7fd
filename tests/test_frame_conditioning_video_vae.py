"""Frame conditioning on the latents of a VAE that compresses time (a causal video VAE: the first frame alone, then
every 4 frames in one latent frame).

Given frames map through the VAE's frame rule: K given frames are the first 1 + (K - 1) / 4 latent frames, encoded
as one clip (so they equal the first latent frames of any clip that starts with them, which is what training
conditioned on); a K the rule does not take and a last picture (the last latent frame holds 4 frames) are refused
by name, at sampling and (first-last) at training.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_frame_conditioning_sample import picture, sidecar, strip_of
from test_sample import run_cli
from tiny import TINY_SPEC, perturbed
from train_data import sample_fields, write_empty_caption
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.image import resize_image
from pipelines.data.media import encode_h264
from pipelines.data.shards import ShardWriter, shard_name
from pipelines.diffusion import make_objective
from pipelines.diffusion.objective import ObjectiveConfig
from pipelines.errors import GentronError
from pipelines.model.configs import model_config
from pipelines.model.gentron import GenTronTransformer
from pipelines.model.text_encoders import TextEncoders
from pipelines.model.tiny import build_tiny_video_vae
from pipelines.model.vae import PixelVideoVAE, load_vae
from pipelines.model_folder import ModelFolder, export_model
from pipelines.sample.given import GivenFrames, encode_given
from pipelines.train.config import TrainConfig
from pipelines.train.setup import pipeline_record

SIDE, FRAMES, LATENT_FRAMES = 16, 9, 3  # 9 frames = 1 + 2 x 4: three latent frames


def smooth_clip(count: int, seed: int, side: int = SIDE) -> np.ndarray:
    """(count, side, side, 3) uint8 frames that change from frame to frame (so a causal VAE sees each one)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frames = [
        np.stack([127 + 100 * np.sin(x / 3 + y / 5 + i / 2 + phase[c]) for c in range(3)], -1) for i in range(count)
    ]
    return np.stack(frames).astype(np.uint8)


@pytest.fixture(scope="module")
def i2v_video_vae_run(tmp_path_factory, tiny_encoders) -> Path:
    """A frame-conditioned tiny T2V model on the latents of the pixel-video VAE (invertible, laid out in time as the
    causal video VAEs are), every weight perturbed so the given frames shape the generated ones."""
    root = tmp_path_factory.mktemp("i2v-video-vae")
    text = TextEncoders(clip=str(tiny_encoders["clip"]), t5=str(tiny_encoders["t5"]), device="cpu")
    empty_path = root / "data" / schema.EMPTY_CAPTION_FILE
    empty_path.parent.mkdir(parents=True)
    np.savez(empty_path, **text.encode([""])[0])
    vae = PixelVideoVAE()
    latent_shape = (LATENT_FRAMES, vae.latent_channels, SIDE, SIDE)
    config = model_config(
        "T/2", in_channels=vae.latent_channels, temporal=True, frame_conditioning=True, text_inputs=text.text_inputs
    )
    objective = make_objective(ObjectiveConfig(name="ddpm"))
    shard_meta = {"latent": vae.record() | {"resolution": SIDE}, "text": text.metadata(), "prep": {"fps": 4.0}}
    train_config = TrainConfig(stage="t2v", condition_frames="prefix")
    record = pipeline_record(train_config, config, shard_meta, latent_shape, objective)
    assert (record.data.frames, record.data.latent_frames) == (FRAMES, LATENT_FRAMES)
    model = perturbed(GenTronTransformer.from_config(config), seed=5, std=0.2)
    scheduler = objective.scheduler(learned_sigma=config["learn_sigma"])
    export_model(config, model.state_dict(), root / "run" / "model", record, empty_path, scheduler)
    return root / "run"


def test_a_continued_clip_is_given_the_latent_frames_that_cover_its_frames(i2v_video_vae_run, tmp_path):
    clip = smooth_clip(7, seed=1)
    (tmp_path / "clip.mp4").write_bytes(encode_h264(clip, fps=4, crf=0))
    with av.open(str(tmp_path / "clip.mp4")) as container:  # what the file decodes to
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    out = tmp_path / "out"
    args = ["--model", i2v_video_vae_run, "--prompt", "a red fox", "--video", tmp_path / "clip.mp4"]
    result = run_cli(*args, "--continue", 5, "--out", out, "--steps", 2)
    assert result.exit_code == 0, result.output
    record = sidecar(out)
    frames = strip_of(out, record)
    assert frames.shape[0] == FRAMES
    # 5 frames = the first frame alone + one latent frame of 4: latent frames 0 and 1, which decode to exactly the
    # clip's last 5 frames; the other 4 frames (latent frame 2) are generated
    given = [resize_image(decoded[k], SIDE, crop=True)[0] for k in range(2, 7)]
    np.testing.assert_array_equal(frames[:5], np.stack(given))
    assert not any(np.array_equal(frames[k], given[-1]) for k in range(5, FRAMES))
    assert record["given"]["latent_frames"] == [0, 1] and record["given"]["frames"] == [0, 1, 2, 3, 4]
    again = run_cli("--from-sidecar", sorted(out.glob("0000_*.json"))[0], "--out", tmp_path / "again")
    assert again.exit_code == 0 and "pixels identical" in again.output, again.output
    # an image is the first latent frame alone, and decodes back to itself
    image = picture(tmp_path / "first.png", SIDE, SIDE, seed=4)
    result = run_cli(
        "--model", i2v_video_vae_run, "--prompt", "x", "--image", tmp_path / "first.png", "--out", tmp_path / "i"
    )
    assert result.exit_code == 0, result.output
    record = sidecar(tmp_path / "i")
    np.testing.assert_array_equal(strip_of(tmp_path / "i", record)[0], image)
    assert record["given"]["latent_frames"] == [0] and record["given"]["frames"] == [0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--video", "{tmp}/clip.mp4", "--continue", "4"], "--continue 4 has 4 frames, but the VAE pixel-video takes"),
        (["--video", "{tmp}/clip.mp4", "--continue", "4"], "use `--continue 5`"),
        (["--video", "{tmp}/clip.mp4", "--continue", "9"], "leave nothing to generate in a video of 3 latent frames"),
        (["--image", "{tmp}/a.png", "--last-image", "{tmp}/a.png"], "--last-image gives one frame, but the VAE"),
    ],
)
def test_given_frames_that_do_not_fit_the_frame_rule_are_refused(i2v_video_vae_run, tmp_path, options, message):
    picture(tmp_path / "a.png", SIDE, SIDE, seed=0)
    (tmp_path / "clip.mp4").write_bytes(encode_h264(smooth_clip(9, seed=2), fps=4, crf=0))
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    result = run_cli("--model", i2v_video_vae_run, "--prompt", "x", "--out", tmp_path / "o", *options)
    assert result.exit_code == 2 and message in result.text and "Traceback" not in result.text, result.text


def test_given_frames_through_a_causal_video_vae_equal_the_first_latent_frames_of_a_clip_starting_with_them(
    tmp_path,
):
    vae = load_vae(str(build_tiny_video_vae(tmp_path / "wan", "wan", seed=3)))
    assert vae.frame_rule.temporal == 4 and vae.causal
    clip = smooth_clip(FRAMES, seed=7)
    whole, _ = vae.encode_clips([clip])[0]  # (3, C, h, w): what training conditions on
    shape = tuple(whole.shape)
    condition = encode_given(vae, [GivenFrames(clip[:5], None), GivenFrames(clip[:1], None)], shape)
    assert condition.mask.tolist() == [[True, True, False], [True, False, False]]
    torch.testing.assert_close(condition.latents[0, :2], whole[:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(condition.latents[1, 0], whole[0], rtol=0, atol=1e-5)
    assert not condition.latents[0, 2].any() and not condition.latents[1, 1:].any()
    assert not torch.allclose(whole[1], whole[2], atol=1e-3)  # the latent frames differ: the check is not trivial
    with pytest.raises(GentronError, match="--continue 3 has 3 frames"):
        encode_given(vae, [GivenFrames(clip[:3], None)], shape)
    with pytest.raises(GentronError, match="--last-image gives one frame"):
        encode_given(vae, [GivenFrames(clip[:1], clip[-1])], shape)


def test_training_first_last_on_latents_compressed_in_time_is_refused_and_prefix_trains(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    with ShardWriter(folder / f"{shard_name(0)}.tar") as writer:  # 3 latent frames of a 4x-in-time VAE
        for i in range(4):
            fields = sample_fields(i, "video", frames=LATENT_FRAMES)
            meta = schema.decode_json(fields[schema.META])
            meta["latent"] |= {"family": "wan", "temporal_downsample": 4, "frame_step": 4}
            writer.write(schema.make_key("video", i), fields | {schema.META: schema.encode_json(meta)})
    write_empty_caption(folder)
    args = ["train", "--stage", "t2v", "--video-data", str(folder), "--model", TINY_SPEC, "--global-batch", "2"]
    args += ["--num-workers", "0", "--steps", "2"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r"), "--condition-frames", "first-last"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "--condition-frames first-last: the training latents come from a VAE" in said
    assert "use --condition-frames first or prefix" in said and "Traceback" not in said
    trained = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p"), "--condition-frames", "prefix"])
    assert trained.exit_code == 0, trained.output
    record = ModelFolder(tmp_path / "p").record
    assert record.conditioning.frames == "prefix" and record.vae.temporal_downsample == 4
    assert (record.data.latent_frames, record.data.frames) == (LATENT_FRAMES, FRAMES)
