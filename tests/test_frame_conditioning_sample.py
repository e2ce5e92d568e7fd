"""`gentron sample` given frames: --image (of another size), --video --continue K, --last-image, one per prompt,
condition guidance, sidecars and --from-sidecar, refusals.

The model is the tiny perturbed T2V model of test_sample.py widened with condition channels (themselves perturbed,
so the given frames shape every generated frame); the pixel VAE makes latents the frames themselves, so a kept
frame comes back as the exact pixels it was given.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from test_sample import VIDEO_FRAMES, VIDEO_RES, export_tiny_model, run_cli
from tiny import perturbed

from pipelines.data.image import resize_image
from pipelines.data.media import encode_h264
from pipelines.diffusion import make_objective
from pipelines.model.gentron import GenTronTransformer
from pipelines.model_folder import EMPTY_CAPTION_FILE, ConditioningRecord, ModelFolder, export_model
from pipelines.sample import outputs
from pipelines.sample.given import GIVEN_SUFFIX


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory, tiny_encoders) -> Path:
    root = tmp_path_factory.mktemp("i2v")
    run = export_tiny_model(root, tiny_encoders, "t2v", "pixel")
    folder = ModelFolder(run)
    model = perturbed(GenTronTransformer.from_t2v(folder.load_model()), seed=2, std=0.2)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    record = replace(folder.record, conditioning=ConditioningRecord(frames="first-last", p=0.9))
    scheduler = make_objective(record.objective).scheduler(learned_sigma=config["learn_sigma"])
    export_model(config, model.state_dict(), run / "model", record, root / "data" / EMPTY_CAPTION_FILE, scheduler)
    return run


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory, tiny_encoders) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("t2v"), tiny_encoders, "t2v", "pixel")


def picture(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random picture (so resizing it is not trivial), written as PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, size=3)
    pixels = np.stack([(base[c] + 3 * x * (c + 1) + 5 * y) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def strip_of(folder: Path, record: dict) -> np.ndarray:
    strip = next(f for f in record["files"] if f.endswith(".frames.png"))
    return outputs.read_frame_strip(folder / strip, record["settings"]["frames"])


def sidecar(folder: Path, index: int = 0) -> dict:
    return json.loads(sorted(folder.glob(f"{index:04d}_*.json"))[0].read_text())


def test_image_to_video_from_an_image_of_another_size_keeps_it_and_regenerates(i2v_run, tmp_path):
    image = picture(tmp_path / "first.png", 40, 24, seed=0)  # portrait, larger than the model's 16 px
    out = tmp_path / "out"
    result = run_cli(
        "--model", i2v_run, "--prompt", "a red fox", "--image", tmp_path / "first.png", "--out", out, "--steps", 3
    )
    assert result.exit_code == 0, result.output
    record = sidecar(out)
    frames = strip_of(out, record)
    # the first frame is the picture resized and center-cropped to 16 x 16 exactly as prep does it
    expected = resize_image(image, VIDEO_RES, crop=True)[0]
    np.testing.assert_array_equal(frames[0], expected)
    assert not np.array_equal(frames[1], frames[0])  # the rest is generated
    given = record["given"]
    assert given["latent_frames"] == [0] and given["frames"] == [0] and given["start_frames"] == 1
    assert given["sources"]["image"]["path"] == str((tmp_path / "first.png").resolve())
    assert len(given["sources"]["image"]["sha256"]) == 64
    np.testing.assert_array_equal(outputs.read_frame_strip(out / given["file"], 1)[0], expected)
    assert given["file"].endswith(GIVEN_SUFFIX)
    assert record["settings"]["condition_scale"] == 1.0
    assert record["batch"]["images"] == [str((tmp_path / "first.png").resolve())]
    # the same seed without the image: another video (the image shapes the frames it does not give)
    plain = run_cli("--model", i2v_run, "--prompt", "a red fox", "--out", tmp_path / "plain", "--steps", 3)
    assert plain.exit_code == 0, plain.output
    assert not np.array_equal(strip_of(tmp_path / "plain", sidecar(tmp_path / "plain"))[1:], frames[1:])
    # --from-sidecar gives the image again and reproduces the pixels
    again = run_cli("--from-sidecar", sorted(out.glob("0000_*.json"))[0], "--out", tmp_path / "again")
    assert again.exit_code == 0 and "pixels identical" in again.output, again.output


def test_an_image_is_cut_to_a_non_square_sample_size_as_prep_cuts_a_bucket(i2v_run, tmp_path):
    image = picture(tmp_path / "first.png", 40, 24, seed=3)  # 24 wide, 40 tall
    out = tmp_path / "wide"
    options = ["--image", tmp_path / "first.png", "--width", 24, "--height", 16, "--steps", 2]
    result = run_cli("--model", i2v_run, "--prompt", "a red fox", "--out", out, *options)
    assert result.exit_code == 0, result.output
    record = sidecar(out)
    assert (record["settings"]["width"], record["settings"]["height"]) == (24, 16)
    # covering 24 x 16 needs no resize (the width already fits): the center 16 rows, rows 12 .. 27
    frames = strip_of(out, record)
    assert frames.shape[1:] == (16, 24, 3)
    np.testing.assert_array_equal(frames[0], image[12:28])
    again = run_cli("--from-sidecar", sorted(out.glob("0000_*.json"))[0], "--out", tmp_path / "again")
    assert again.exit_code == 0 and "pixels identical" in again.output, again.output


def test_continuation_keeps_the_last_k_frames_of_a_video(i2v_run, tmp_path):
    rng = np.random.default_rng(1)
    clip = np.repeat(rng.integers(0, 255, size=(6, 1, 1, 3), dtype=np.uint8), 20, axis=1).repeat(20, axis=2)
    clip[:, :, :, 0] = np.arange(6)[:, None, None] * 40  # each frame its own red level
    (tmp_path / "clip.mp4").write_bytes(encode_h264(clip, fps=4, crf=0))
    with av.open(str(tmp_path / "clip.mp4")) as container:  # what the file decodes to
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    out = tmp_path / "out"
    result = run_cli(
        "--model",
        i2v_run,
        "--prompt",
        "a red fox",
        "--video",
        tmp_path / "clip.mp4",
        "--continue",
        2,
        "--out",
        out,
        "--steps",
        3,
    )
    assert result.exit_code == 0, result.output
    record = sidecar(out)
    frames = strip_of(out, record)
    for k, source in enumerate((4, 5)):  # the clip's last two frames (at the model's 4 FPS: every frame)
        np.testing.assert_array_equal(frames[k], resize_image(decoded[source], VIDEO_RES, crop=True)[0])
    assert record["given"]["latent_frames"] == [0, 1] and record["given"]["sources"]["video"]["continue"] == 2
    assert record["settings"]["continue_frames"] == 2
    # a video too short for --continue, and --continue as long as the video to make: refused by name
    short = run_cli(
        "--model", i2v_run, "--prompt", "x", "--video", tmp_path / "clip.mp4", "--continue", 7, "--out", tmp_path / "s"
    )
    assert short.exit_code == 2 and "has 6 frame(s) at the model's 4 FPS" in short.text, short.text
    full = run_cli(
        "--model", i2v_run, "--prompt", "x", "--video", tmp_path / "clip.mp4", "--continue", 4, "--out", tmp_path / "f"
    )
    assert full.exit_code == 2 and "leave nothing to generate" in full.text, full.text


def test_first_and_last_image_one_per_prompt_with_condition_guidance(i2v_run, tmp_path):
    firsts = [picture(tmp_path / f"first{i}.png", 16, 16, seed=10 + i) for i in range(2)]
    lasts = [picture(tmp_path / f"last{i}.png", 16, 16, seed=20 + i) for i in range(2)]
    out = tmp_path / "out"
    args = ["--model", i2v_run, "--prompt", "a red fox", "--prompt", "a blue car", "--steps", 3, "--batch-size", 2]
    for i in range(2):
        args += ["--image", tmp_path / f"first{i}.png", "--last-image", tmp_path / f"last{i}.png"]
    result = run_cli(*args, "--out", out, "--condition-scale", 2.0)
    assert result.exit_code == 0, result.output
    videos = []
    for i in range(2):
        record = sidecar(out, i)
        frames = strip_of(out, record)
        np.testing.assert_array_equal(frames[0], firsts[i])
        np.testing.assert_array_equal(frames[-1], lasts[i])
        assert record["given"]["latent_frames"] == [0, VIDEO_FRAMES - 1]
        assert record["given"]["frames"] == [0, VIDEO_FRAMES - 1]
        assert record["settings"]["condition_scale"] == 2.0
        videos.append(frames)
    # condition guidance changes the generated frames, not the given ones
    plain = tmp_path / "plain"
    assert run_cli(*args, "--out", plain).exit_code == 0
    unguided = strip_of(plain, sidecar(plain, 0))
    np.testing.assert_array_equal(unguided[[0, -1]], videos[0][[0, -1]])
    assert not np.array_equal(unguided[1:-1], videos[0][1:-1])
    again = run_cli("--from-sidecar", sorted(out.glob("0001_*.json"))[0], "--out", tmp_path / "again")
    assert again.exit_code == 0 and "pixels identical" in again.output, again.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--video", "{tmp}/a.png"], "--video needs --continue K"),
        (["--continue", "2"], "--video needs --continue K"),
        (["--image", "{tmp}/a.png", "--video", "{tmp}/a.png", "--continue", "1"], "--image and --video both give"),
        (["--image", "{tmp}/a.png", "--image", "{tmp}/a.png", "--image", "{tmp}/a.png"], "3 --image for 2 prompts"),
        (["--condition-scale", "2"], "guides on given frames, but none are given"),
        (["--image", "{tmp}/missing.png"], "--image not found"),
        (["--image", "{tmp}/bad.png"], "cannot read the image"),
        (["--image", "{tmp}/a.png", "--frames", "1"], "given frames need a video"),
    ],
)
def test_given_frames_that_cannot_take_effect_are_refused(i2v_run, tmp_path, options, message):
    picture(tmp_path / "a.png", 16, 16, seed=0)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    result = run_cli("--model", i2v_run, "--prompt", "x", "--prompt", "y", "--out", tmp_path / "o", *options)
    assert result.exit_code == 2 and message in result.text and "Traceback" not in result.text, result.text


def test_a_model_without_frame_conditioning_refuses_given_frames(t2v_run, tmp_path):
    picture(tmp_path / "a.png", 16, 16, seed=0)
    result = run_cli("--model", t2v_run, "--prompt", "x", "--image", tmp_path / "a.png", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "it was not trained with frame conditioning" in result.text, result.text
    assert "loading model" not in result.text


# --------------------------------------------------------------------------- gentron eval --given


def ssim_by_hand(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM written out position by position (Wang et al. 2004), for comparison with the vectorised one."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_against_their_formulas():
    from pipelines.evaluate.fidelity import PSNR_IDENTICAL, given_fidelity, psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(14, 15, 3), dtype=np.uint8)
    noisy = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - noisy) ** 2)
    assert psnr(a, noisy) == pytest.approx(10 * np.log10(255**2 / mse))
    assert psnr(a, a) == PSNR_IDENTICAL and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, noisy) == pytest.approx(ssim_by_hand(a, noisy), rel=1e-9)
    assert ssim(a, noisier) == pytest.approx(ssim_by_hand(a, noisier), rel=1e-9)
    assert 0 < ssim(a, noisier) < ssim(a, noisy) < 1
    assert ssim(noisy, a) == pytest.approx(ssim(a, noisy))
    video = np.stack([noisy, noisier, a])
    scores = given_fidelity(video, np.stack([a, a]), [0, 2])
    assert scores["first_frame_psnr"] == psnr(noisy, a) and scores["first_frame_ssim"] == ssim(noisy, a)
    assert scores["psnr"] == pytest.approx((psnr(noisy, a) + PSNR_IDENTICAL) / 2)


def test_eval_given_reports_how_videos_keep_their_frames(i2v_run, tmp_path):
    from pipelines.evaluate.fidelity import PSNR_IDENTICAL, psnr, ssim
    from pipelines.model.tiny_eval import build_tiny_clip_model

    picture(tmp_path / "a.png", 16, 16, seed=3)
    out = tmp_path / "out"
    args = ["--model", i2v_run, "--prompt", "a red fox", "--prompt", "a cat", "--image", tmp_path / "a.png"]
    assert run_cli(*args, "--out", out, "--steps", 2, "--batch-size", 1).exit_code == 0  # two batches
    plain = tmp_path / "plain"  # a folder without given frames is refused by --given
    assert run_cli("--model", i2v_run, "--prompt", "x", "--out", plain, "--steps", 1).exit_code == 0
    from typer.testing import CliRunner

    from gentron_cli.main import app

    refused = CliRunner().invoke(app, ["eval", str(plain), "--given"])
    assert refused.exit_code == 2 and "no sample in" in refused.output
    # the pixel VAE keeps the first frame exactly; spoil the recorded given frame of sample 1 to see a finite PSNR
    record = sidecar(out, 1)
    strip_path = out / record["given"]["file"]
    spoiled = outputs.read_frame_strip(strip_path, 1)[0].copy()
    spoiled[::2] //= 2
    outputs.write_png(strip_path, spoiled)
    clip = build_tiny_clip_model(tmp_path / "clip")
    result = CliRunner().invoke(app, ["eval", str(out), "--given", "--clip", str(clip)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "first frame PSNR" in result.output and "CLIP image similarity" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    per_sample = {s["sample"]: s["given"] for s in metrics["per_sample"]}
    first, second = per_sample[sorted(per_sample)[0]], per_sample[sorted(per_sample)[1]]
    assert first["first_frame_psnr"] == PSNR_IDENTICAL and first["first_frame_ssim"] == pytest.approx(1.0)
    video = strip_of(out, record)
    assert second["first_frame_psnr"] == pytest.approx(psnr(video[0], spoiled))
    assert second["first_frame_ssim"] == pytest.approx(ssim(video[0], spoiled))
    assert -1 <= first["clip_image_similarity"] <= 1 and second["frames"] == [0]
    summary = metrics["given"]
    assert summary["videos"] == 2
    assert summary["first_frame_psnr"] == pytest.approx((PSNR_IDENTICAL + second["first_frame_psnr"]) / 2)
    assert summary["clip_image_similarity"] == pytest.approx(
        (first["clip_image_similarity"] + second["clip_image_similarity"]) / 2
    )
