"""Each VAE family end to end through the CLI: a tiny random VAE saved by path in the diffusers layout ->
encode-latents -> encode-text -> train --stage t2i -> train --stage t2v -> sample (tiny model, 2 steps, 16 px).
The exported model folder records the family, ratios and normalisation, and sampling decodes through the same
adapter to the clips' own frame count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import media, schema
from pipelines.data.shards import ShardWriter
from pipelines.evaluate.evaluator import list_samples
from pipelines.model.tiny import TINY_VIDEO_VAE_FAMILIES, build_tiny_encoders, build_tiny_video_vae
from pipelines.model.vae import load_vae

runner = CliRunner()
TINY = {"size": "T/2", "depth": 1, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}
FAMILIES = (*TINY_VIDEO_VAE_FAMILIES, "pixel-video")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_encoders(tmp_path_factory.mktemp("encoders"), seed=0)


def _frames(count: int, seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = rng.uniform(0, 2 * np.pi, size=3)
    out = [np.stack([127 + 100 * np.sin(x / 4 + y / 6 + i / 2 + base[c]) for c in range(3)], -1) for i in range(count)]
    return np.stack(out).astype(np.uint8)


def _prep_shards(folder: Path, kind: str, frames: int) -> Path:
    """Shards as prep-images / prep-videos write them: 4 samples with captions."""
    folder.mkdir(parents=True)
    with ShardWriter(folder / "000000.tar") as writer:
        for i in range(4):
            fields = {
                schema.CAPTION: schema.encode_caption(f"a {kind} number {i}"),
                schema.META: schema.encode_json({"prep": {"clip_fps": 4.0, "index": i}}),
            }
            if kind == "clip":
                fields[schema.VIDEO] = media.encode_clip(_frames(frames, i), fps=4)
            else:
                fields[schema.IMAGE_PNG] = media.encode_image(_frames(1, 50 + i)[0], fmt="png")
            writer.write(f"{kind}{i}", fields)
    return folder


def _cli(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_encode_train_t2i_t2v_and_sample(tmp_path, encoders, family):
    vae = "pixel-video" if family == "pixel-video" else str(build_tiny_video_vae(tmp_path / "vae", family, seed=1))
    rule = load_vae(vae).frame_rule
    frames = 1 + 2 * rule.step  # 9 frames for the 4x families, 17 for CogVideoX and the tiny LTX (8k+1)
    encoded = {}
    for kind in ("image", "clip"):
        prepped = _prep_shards(tmp_path / f"{kind}-prep", kind, frames)
        _cli("encode-latents", prepped, "-o", tmp_path / f"{kind}-latents", "--vae", vae, "--resolution", 16)
        encoded[kind] = tmp_path / f"{kind}-encoded"
        _cli(
            "encode-text",
            tmp_path / f"{kind}-latents",
            "-o",
            encoded[kind],
            "--clip",
            encoders["clip"],
            "--t5",
            encoders["t5"],
        )

    model = TINY | ({"patch_size": 1} if family == "ltx" else {})  # LTX's 32x wants patch 1: a valid setting
    common = ["--model", json.dumps(model), "--steps", 2, "--global-batch", 2, "--num-workers", 0, "--seed", 0]
    _cli("train", "--stage", "t2i", "--image-data", encoded["image"], "--out", tmp_path / "t2i", *common)
    _cli(
        "train",
        "--stage",
        "t2v",
        "--init",
        tmp_path / "t2i" / "model",
        "--video-data",
        encoded["clip"],
        "--image-data",
        encoded["image"],
        "--p-motion-free",
        0.5,
        "--out",
        tmp_path / "t2v",
        *common[2:],
    )
    patch = json.loads((tmp_path / "t2i" / "model" / "config.json").read_text())["patch_size"]
    assert patch == (1 if family in ("ltx", "wan2.2") else 2)  # Wan 2.2's 16x: patch 1 from the data, by default
    run_config = json.loads((tmp_path / "t2v" / "config.json").read_text())
    assert run_config["image_frames"] == "one"  # auto with a video VAE: images as one latent frame
    record = json.loads((tmp_path / "t2v" / "model" / "pipeline.json").read_text())
    latent_frames = rule.latent_frames(frames)
    expected_family = "wan" if family == "wan2.2" else family
    assert record["vae"]["family"] == expected_family and record["vae"]["temporal_downsample"] == rule.temporal
    assert record["vae"]["normalisation"] == load_vae(vae).normalisation.record()
    assert record["data"]["frames"] == frames and record["data"]["latent_frames"] == latent_frames

    out = tmp_path / "samples"
    _cli("sample", "--model", tmp_path / "t2v", "--prompt", "a clip number 1", "--out", out, "--steps", 2)
    (sample,) = list_samples(out)
    assert sample.frames == frames and sample.read_pixels().shape == (frames, 16, 16, 3)
    _cli("sample", "--model", tmp_path / "t2i", "--prompt", "an image", "--out", tmp_path / "image", "--steps", 2)
    (image,) = list_samples(tmp_path / "image")
    assert image.read_pixels().shape == (16, 16, 3)
    refused = runner.invoke(
        app,
        ["sample", "--model", str(tmp_path / "t2v"), "--prompt", "x", "--out", str(tmp_path / "bad"), "--frames", "8"],
        env={"COLUMNS": "1000"},
    )
    assert refused.exit_code == 2 and rule.describe() in refused.output and "--frames 9" in refused.output


def _encode(tmp_path: Path, encoders, kind: str, vae: str, frames: int, name: str) -> Path:
    prepped = tmp_path / f"{name}-prep"
    if not prepped.exists():
        _prep_shards(prepped, kind, frames)
    _cli("encode-latents", prepped, "-o", tmp_path / f"{name}-latents", "--vae", vae, "--resolution", 16)
    _cli(
        "encode-text",
        tmp_path / f"{name}-latents",
        "-o",
        tmp_path / name,
        "--clip",
        encoders["clip"],
        "--t5",
        encoders["t5"],
    )
    return tmp_path / name


def test_pseudo_video_frames_follow_the_vae_and_sources_must_share_a_vae(tmp_path, encoders):
    images = _encode(tmp_path, encoders, "image", "pixel-video", 1, "images")
    common = ["--model", json.dumps(TINY), "--steps", 1, "--global-batch", 2, "--num-workers", 0]
    # t2v from images alone: --frames counts frames, the pseudo-videos have its latent frames (9 -> 3)
    # (--image-frames one needs clips to differ from: without them it is announced, and pseudo-videos are used)
    said = _cli(
        "train", "--stage", "t2v", "--image-data", images, "--frames", 9, "--image-frames", "one",
        "--out", tmp_path / "still", *common,
    )  # fmt: skip
    assert "stills alone train as pseudo-videos" in said
    record = json.loads((tmp_path / "still" / "model" / "pipeline.json").read_text())
    assert record["data"]["latent_shape"][0] == 3 and record["data"]["frames"] == 9
    assert json.loads((tmp_path / "still" / "config.json").read_text())["image_frames"] == "pseudo-video"
    refused = runner.invoke(
        app,
        ["train", "--stage", "t2v", "--image-data", str(images), "--frames", "8", "--out", str(tmp_path / "x")]
        + [str(a) for a in common],
        env={"COLUMNS": "1000"},
    )
    assert refused.exit_code == 2 and "4k+1" in refused.output and "--frames 9" in refused.output

    # images and clips through two VAEs of one family whose normalisations differ: refused by name
    wan_a = build_tiny_video_vae(tmp_path / "wan_a", "wan", seed=1)
    wan_b = build_tiny_video_vae(tmp_path / "wan_b", "wan", seed=2)
    a = _encode(tmp_path, encoders, "image", str(wan_a), 1, "wan-images")
    b = _encode(tmp_path, encoders, "clip", str(wan_b), 9, "wan-clips")
    refused = runner.invoke(
        app,
        ["train", "--stage", "t2v", "--image-data", str(a), "--video-data", str(b), "--out", str(tmp_path / "y")]
        + [str(x) for x in common],
        env={"COLUMNS": "1000"},
    )
    assert refused.exit_code == 2 and "encode images and clips with the same VAE" in refused.output

    # sampling a model of wan_b's latents with wan_a: same channels and time layout, other normalisation: said
    _cli("train", "--stage", "t2v", "--video-data", b, "--out", tmp_path / "wan-run", *common)
    said = _cli(
        "sample",
        "--model",
        tmp_path / "wan-run",
        "--prompt",
        "p",
        "--out",
        tmp_path / "s",
        "--steps",
        1,
        "--vae",
        wan_a,
    )
    assert "normalises its latents" in said and "with other values" in said


def test_images_as_one_latent_frame_fill_buckets_of_their_own(tmp_path, encoders):
    images = _encode(tmp_path, encoders, "image", "pixel-video", 1, "images")
    clips = _encode(tmp_path, encoders, "clip", "pixel-video", 9, "clips")
    common = ["--model", json.dumps(TINY), "--global-batch", 4, "--num-workers", 0, "--p-motion-free", 0.5]
    run = ["train", "--stage", "t2v", "--image-data", images, "--video-data", clips, "--out", tmp_path / "run"]
    _cli(*run, *common, "--steps", 2, "--checkpoint-every", 1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_frames"] == "one"
    table = json.loads((tmp_path / "run" / "data_stats.json").read_text())["buckets"]
    rows = {(r["frames"], r["images"] > 0, r["clips"] > 0): r for r in table["buckets"]}
    # the images: a bucket of one latent frame, no clips; the clips (3 latent frames): no images; p each way
    assert set(rows) == {(1, True, False), (3, False, True)}, table["buckets"]
    assert rows[(1, True, False)]["share_of_steps"] == rows[(3, False, True)]["share_of_steps"] == 0.5
    # a step is all images or all clips: the data does not depend on the micro-batch size, so this resumes
    _cli(*run, *common, "--steps", 3, "--grad-accum", 2)
    said = _cli(
        "train",
        "--stage",
        "t2i",
        "--image-data",
        images,
        "--out",
        tmp_path / "t2i",
        *common,
        "--steps",
        1,
        "--image-frames",
        "one",
    )
    assert "--image-frames one applies to --stage t2v" in said


def test_sample_vae_options_are_recorded_and_a_vae_of_another_frame_rule_is_refused(tmp_path, encoders):
    hunyuan = str(build_tiny_video_vae(tmp_path / "hunyuan", "hunyuanvideo", seed=0))
    clips = _encode(tmp_path, encoders, "clip", hunyuan, 9, "clips")
    common = ["--model", json.dumps(TINY), "--steps", 1, "--global-batch", 2, "--num-workers", 0]
    _cli("train", "--stage", "t2v", "--video-data", clips, "--out", tmp_path / "run", *common)
    out = tmp_path / "tiled"
    _cli(
        "sample",
        "--model",
        tmp_path / "run",
        "--prompt",
        "p",
        "--out",
        out,
        "--steps",
        1,
        "--vae-tiling",
        "--vae-slicing",
    )
    (sample,) = list_samples(out)
    settings = json.loads(sample.sidecar.read_text())["settings"]
    assert settings["vae_tiling"] is True and settings["vae_slicing"] is True and sample.frames == 9
    # CogVideoX: the same 4 channels and 4x, but clips of 8k+1 frames: the model's 3 latent frames mean other frames
    cog = str(build_tiny_video_vae(tmp_path / "cog", "cogvideox", seed=0))
    refused = runner.invoke(
        app,
        ["sample", "--model", str(tmp_path / "run"), "--prompt", "p", "--out", str(tmp_path / "z"), "--vae", cog],
        env={"COLUMNS": "1000"},
    )
    assert refused.exit_code == 2 and "8k+1" in refused.output and "4k+1" in refused.output
    refused = runner.invoke(
        app,
        ["sample", "--model", str(tmp_path / "run"), "--prompt", "p", "--out", str(tmp_path / "z"), "--frames", "7"],
        env={"COLUMNS": "1000"},
    )
    assert refused.exit_code == 2 and "--frames 9" in refused.output
