"""`gentron sample`: outputs, sidecar regeneration, guidance inside the sampler, determinism, errors.

Model folders are written the way `gentron train` writes them (`model_folder.export_model` with
`train.setup.pipeline_record`), around tiny random-initialised encoders saved by `build_tiny_encoders`.
Every weight of the tiny model is perturbed, so zero-initialised paths (adaLN-Zero, cross-attention,
TempSelfAttn, final layer) all shape the output and every comparison below can fail.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tiny import perturbed
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.diffusion import ObjectiveConfig, make_objective
from pipelines.diffusion.objective import make_scheduler
from pipelines.model.configs import model_config
from pipelines.model.gentron import GenTronTransformer
from pipelines.model.text_encoders import TextEncoders
from pipelines.model_folder import export_model
from pipelines.sample import outputs
from pipelines.sample.pipeline import Generation, SamplingPipeline
from pipelines.sample.sampling import SampleConfig, load_pipeline, sample, sample_seed
from pipelines.train.config import TrainConfig
from pipelines.train.setup import pipeline_record

runner = CliRunner()
VIDEO_FRAMES, VIDEO_RES = 4, 16  # pixel VAE: latents are the 16x16 frames themselves
TRAINED_STEPS = 7  # what the exported folders record as their training step
IMAGE_RES = 32  # tiny 8x VAE: 4 x 4 x 4 latents


def export_tiny_model(
    folder: Path, encoders: dict[str, Path], stage: str, vae: str, seed: int = 0, objective: str = "ddpm"
) -> Path:
    """A run folder (RUN/model) as `gentron train` exports it, for a perturbed T/2 model."""
    text = TextEncoders(clip=str(encoders["clip"]), t5=str(encoders["t5"]), device="cpu")
    empty_path = folder / "data" / schema.EMPTY_CAPTION_FILE
    empty_path.parent.mkdir(parents=True)
    np.savez(empty_path, **text.encode([""])[0])
    if vae == "pixel":
        latent_meta = {"vae": "pixel", "scaling_factor": 1.0, "resolution": VIDEO_RES, "downsample": 1}
        latent_shape = (VIDEO_FRAMES, 3, VIDEO_RES, VIDEO_RES)
    else:
        latent_meta = {"vae": str(encoders["vae"]), "scaling_factor": 0.18215, "resolution": IMAGE_RES, "downsample": 8}
        latent_shape = (4, IMAGE_RES // 8, IMAGE_RES // 8)
    config = model_config(
        "T/2",
        in_channels=latent_shape[-3],
        temporal=stage == "t2v",
        learn_sigma=objective == "ddpm",
        text_inputs=text.text_inputs,
    )
    trained_with = make_objective(ObjectiveConfig(name=objective, noise_shift=2.0 if objective == "flow" else 1.0))
    shard_meta = {"latent": latent_meta, "text": text.metadata(), "prep": {"fps": 4.0}}
    pipeline = pipeline_record(TrainConfig(stage=stage), config, shard_meta, latent_shape, trained_with)
    pipeline = replace(pipeline, step=TRAINED_STEPS)
    model = perturbed(GenTronTransformer.from_config(config), seed)
    scheduler = trained_with.scheduler(learned_sigma=config["learn_sigma"])
    export_model(config, model.state_dict(), folder / "run" / "model", pipeline, empty_path, scheduler)
    return folder / "run"


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, tiny_encoders) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("video"), tiny_encoders, "t2v", "pixel")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_encoders) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("image"), tiny_encoders, "t2i", "tiny")


def run_cli(*args: str):
    # a console wide enough that no path is folded mid-word; then the message as one line
    result = runner.invoke(app, ["sample", *map(str, args)], env={"COLUMNS": "1000"})
    result.text = " ".join(result.output.split())
    return result


def read_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_gif(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- writers


def smooth_video(frames: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    video = [np.stack([(x * 5 + 9 * t) % 256, (y * 7) % 256, np.full_like(x, 40 * t)], axis=-1) for t in range(frames)]
    return np.stack(video).astype(np.uint8)


def test_writers_round_trip(tmp_path):
    video = smooth_video()
    outputs.write_mp4(tmp_path / "v.mp4", video, fps=4)
    decoded = read_mp4(tmp_path / "v.mp4")
    assert decoded.shape == video.shape
    assert np.abs(decoded.astype(int) - video).mean() < 4  # lossy, but close on smooth content
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert container.streams.video[0].average_rate == 4

    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [20, 40, 250]], dtype=np.uint8)
    few_colours = palette[np.random.default_rng(0).integers(0, 4, size=(3, 8, 10))]
    outputs.write_gif(tmp_path / "v.gif", few_colours, fps=4)
    np.testing.assert_array_equal(read_gif(tmp_path / "v.gif"), few_colours)  # <= 256 colours: exact
    with Image.open(tmp_path / "v.gif") as im:
        assert im.info["duration"] == 250 and im.info["loop"] == 0

    image = video[0]
    outputs.write_png(tmp_path / "i.png", image)
    np.testing.assert_array_equal(read_png(tmp_path / "i.png"), image)


def test_contact_sheet_layout():
    cells = [np.full((4, 6, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    sheet = outputs.contact_sheet(cells)  # 3 -> 2 columns, 2 rows, 2 px white gaps
    assert sheet.shape == (4 * 2 + 2, 6 * 2 + 2, 3)
    assert (sheet[:4, :6] == 10).all() and (sheet[:4, 8:] == 20).all() and (sheet[6:, :6] == 30).all()
    assert (sheet[4:6] == 255).all() and (sheet[:, 6:8] == 255).all() and (sheet[6:, 8:] == 255).all()
    videos = [np.stack([c, c + 1]) for c in cells]
    sheet = outputs.contact_sheet(videos, columns=3)
    assert sheet.shape == (2, 4, 6 * 3 + 4, 3)
    assert (sheet[1, :, :6] == 11).all() and (sheet[0, :, 16:] == 30).all()


# --------------------------------------------------------------------------- CLI end to end


def test_cli_video_outputs_grid_and_sidecar_regeneration(video_run, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "--model",
        video_run,
        "--prompt",
        "a red fox",
        "--prompt",
        "a blue car",
        "--out",
        out,
        "--steps",
        2,
        "--batch-size",
        2,
        "--seed",
        7,
        "--grid",
    )
    assert result.exit_code == 0, result.output
    assert f"(training step {TRAINED_STEPS})" in " ".join(result.output.split())  # which export was loaded

    sidecars = sorted(out.glob("000*.json"))
    assert [p.name for p in sidecars] == ["0000_a-red-fox.json", "0001_a-blue-car.json"]
    records = [json.loads(p.read_text()) for p in sidecars]
    videos = []
    for record in records:
        assert record["settings"]["frames"] == VIDEO_FRAMES and record["settings"]["mfg_scale"] == 1.1
        assert record["sample_seed"] == sample_seed(7, record["index"])
        assert record["model"]["step"] == TRAINED_STEPS
        digests = record["model"]["weights_sha256"]
        assert (
            list(digests) == ["diffusion_pytorch_model.safetensors"]
            and len(digests["diffusion_pytorch_model.safetensors"]) == 64
        )
        mp4, gif, strip = (out / name for name in record["files"])
        assert mp4.suffix == ".mp4" and gif.suffix == ".gif" and strip.name.endswith(".frames.png")
        gif_frames = read_gif(gif)
        mp4_frames = read_mp4(mp4)
        assert gif_frames.shape == mp4_frames.shape == (VIDEO_FRAMES, VIDEO_RES, VIDEO_RES, 3)
        # the film strip holds the generated pixels exactly: their hash is the sidecar's
        assert outputs.pixels_sha256(outputs.read_frame_strip(strip, VIDEO_FRAMES)) == record["pixels_sha256"]
        videos.append((gif_frames, mp4_frames))
    (gif_a, mp4_a), (gif_b, mp4_b) = videos
    assert not np.array_equal(gif_a, gif_b)  # two prompts, two seeds: two different videos
    # (an untrained model's frames are pixel noise, which 16 px H.264 cannot hold: fidelity is tested below)

    # contact sheet: two 16 px videos side by side with a 2 px gap
    grid = read_gif(out / "grid.gif")
    assert grid.shape == (VIDEO_FRAMES, VIDEO_RES, 2 * VIDEO_RES + 2, 3)
    np.testing.assert_array_equal(grid[:, :, :VIDEO_RES], gif_a)
    np.testing.assert_array_equal(grid[:, :, VIDEO_RES + 2 :], gif_b)
    assert read_mp4(out / "grid.mp4").shape == grid.shape

    # --from-sidecar regenerates the same pixels (sidecar hash and the lossless GIF); the MP4 is H.264,
    # which x264 does not reproduce bit for bit, so it is checked to decode to the same frame count
    again = tmp_path / "again"
    result = run_cli("--from-sidecar", sidecars[1], "--out", again)
    assert result.exit_code == 0, result.output
    assert "pixels identical" in result.output
    np.testing.assert_array_equal(read_gif(again / "0001_a-blue-car.gif"), gif_b)
    assert read_mp4(again / "0001_a-blue-car.mp4").shape == read_mp4(out / "0001_a-blue-car.mp4").shape


def test_the_sampler_follows_the_recorded_objective(tmp_path, tiny_encoders, image_run):
    """A flow model samples with its Euler flow scheduler and its recorded shift, refuses DDPM samplers; a model
    folder from before objectives were recorded samples as DDPM (ddim)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow_run = export_tiny_model(tmp_path / "flow", tiny_encoders, "t2i", "tiny", objective="flow")
    saved = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_run / "model" / "scheduler")
    assert saved.config.shift == 2.0
    result = run_cli("--model", flow_run, "--prompt", "a red circle", "--out", tmp_path / "flow-out", "--steps", 3)
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "flow-out").glob("*.json")).read_text())
    assert record["settings"]["scheduler"] == "euler"
    refused = run_cli("--model", flow_run, "--prompt", "a red circle", "--out", tmp_path / "no", "--scheduler", "ddim")
    assert refused.exit_code == 2 and "does not apply to a model trained with the flow objective" in refused.text

    old = tmp_path / "old" / "model"
    shutil.copytree(image_run / "model", old)
    pipeline = json.loads((old / "pipeline.json").read_text())
    del pipeline["objective"]
    (old / "pipeline.json").write_text(json.dumps(pipeline))
    shutil.rmtree(old / "scheduler")
    result = run_cli("--model", old, "--prompt", "a red circle", "--out", tmp_path / "old-out", "--steps", 3)
    assert result.exit_code == 0, result.output
    assert json.loads(next((tmp_path / "old-out").glob("*.json")).read_text())["settings"]["scheduler"] == "ddim"


def test_cli_image_model_png_from_prompts_file(image_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na cup of coffee\n\na dog on the beach\n")
    out = tmp_path / "out"
    result = run_cli(
        "--model",
        image_run / "model",
        "--prompts",
        prompts,
        "--out",
        out,
        "--steps",
        2,
        "--scheduler",
        "dpm-solver++",
        "--cfg",
        4,
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["0000_a-cup-of-coffee.png", "0001_a-dog-on-the-beach.png"]
    images = [read_png(p) for p in pngs]
    assert all(im.shape == (IMAGE_RES, IMAGE_RES, 3) for im in images)
    assert not np.array_equal(images[0], images[1])
    record = json.loads((out / "0000_a-cup-of-coffee.json").read_text())
    assert record["settings"]["mfg_scale"] == 1.0 and record["settings"]["frames"] == 1
    assert record["pixels_sha256"] == outputs.pixels_sha256(images[0])

    result = run_cli("--from-sidecar", out / "0000_a-cup-of-coffee.json", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_png(tmp_path / "again" / "0000_a-cup-of-coffee.png"), images[0])


# --------------------------------------------------------------------------- guidance inside the sampler


@pytest.fixture(scope="module")
def video_pipe(video_run, tmp_path_factory) -> SamplingPipeline:
    return load_pipeline(SampleConfig(model=video_run, out=tmp_path_factory.mktemp("unused"), device="cpu"))


PROMPTS, SEEDS = ["a red fox", "a blue car"], [3, 4]


def video_generation(steps: int, scheduler: str, cfg_scale: float, mfg_scale: float) -> Generation:
    return Generation(steps, scheduler, cfg_scale, mfg_scale, VIDEO_FRAMES, VIDEO_RES, VIDEO_RES)


def starting_noise(pipe: SamplingPipeline, seeds: list[int]) -> torch.Tensor:
    shape = pipe.latent_shape(VIDEO_FRAMES, VIDEO_RES, VIDEO_RES)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to float rounding, relative to the size of the values (untrained models give large latents)."""
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale + 1e-6, (actual - expected).abs().max().item()


def test_guided_prediction_inside_sampler_matches_formula(video_pipe):
    calls = []
    hook = video_pipe.model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, kwargs, output)), with_kwargs=True
    )
    try:
        cfg_scale, mfg_scale = 3.0, 1.25
        latents = video_pipe.generate(PROMPTS, SEEDS, video_generation(1, "ddim", cfg_scale, mfg_scale)).latents
    finally:
        hook.remove()

    assert len(calls) == 1  # one forward for the whole guided step
    (x, timestep, text), kwargs, output = calls[0]
    b = len(PROMPTS)
    noise = starting_noise(video_pipe, SEEDS)
    for branch in x.chunk(3):
        torch.testing.assert_close(branch, noise, rtol=0, atol=0)
    assert kwargs["motion_free"].tolist() == [False] * b + [False] * b + [True] * b
    cond = video_pipe.text_condition(video_pipe.text_encoders.encode(PROMPTS))
    uncond = video_pipe.text_condition([video_pipe.uncond_arrays] * b)
    assert text.index(slice(0, b)).equal(cond) and set(cond.tokens) == {"clip", "t5"}
    for part in (slice(b, 2 * b), slice(2 * b, 3 * b)):
        assert text.index(part).equal(uncond)

    channels = x.shape[2]
    eps_cond, eps_motion, eps_none = (o[:, :, :channels] for o in output.chunk(3))
    guided = eps_none + cfg_scale * (eps_cond - eps_motion) + mfg_scale * (eps_motion - eps_none)
    scheduler = make_scheduler("ddim", learned_sigma=True)
    scheduler.set_timesteps(1)
    expected = scheduler.step(guided, scheduler.timesteps[0], noise).prev_sample
    assert_close(latents, expected)


def manual_sampling(pipe: SamplingPipeline, noise, text, uncond, cfg_scale: float, steps: int, motion: bool):
    """Reference loop: separate forward passes, CFG by hand, temporal attention explicitly on."""
    scheduler = make_scheduler("dpm-solver++", learned_sigma=True)
    scheduler.set_timesteps(steps)
    motion_free = torch.zeros(noise.shape[0], dtype=torch.bool) if motion else None
    x = noise
    channels = noise.shape[2]
    with torch.no_grad():
        for t in scheduler.timesteps:
            ts = t.expand(noise.shape[0])
            eps = pipe.model(x, ts, text, motion_free=motion_free)[:, :, :channels]
            if cfg_scale != 1.0:
                eps_u = pipe.model(x, ts, uncond, motion_free=motion_free)[:, :, :channels]
                eps = eps_u + cfg_scale * (eps - eps_u)
            x = scheduler.step(eps.transpose(1, 2), t, x.transpose(1, 2)).prev_sample.transpose(1, 2)
    return x


def test_mfg_one_is_cfg_and_no_guidance_is_conditional(video_pipe):
    steps, b = 3, len(PROMPTS)
    noise = starting_noise(video_pipe, SEEDS)
    text = video_pipe.text_condition(video_pipe.text_encoders.encode(PROMPTS))
    uncond = video_pipe.text_condition([video_pipe.uncond_arrays] * b)

    def run(cfg_scale, mfg_scale):
        return video_pipe.generate(
            PROMPTS, SEEDS, video_generation(steps, "dpm-solver++", cfg_scale, mfg_scale)
        ).latents

    cfg_only = run(4.0, 1.0)
    assert_close(cfg_only, manual_sampling(video_pipe, noise, text, uncond, 4.0, steps, motion=True))
    assert_close(run(1.0, 1.0), manual_sampling(video_pipe, noise, text, uncond, 1.0, steps, motion=True))
    # and the scales matter: motion guidance and text guidance each change the result
    assert (run(4.0, 1.3) - cfg_only).abs().max() > 1e-2 * cfg_only.abs().max()
    assert (run(1.0, 1.0) - cfg_only).abs().max() > 1e-2 * cfg_only.abs().max()


def test_negative_prompt_replaces_the_empty_caption(video_run, video_pipe, tmp_path):
    empty = np.load(video_run / "model" / schema.EMPTY_CAPTION_FILE)
    for name, value in video_pipe.uncond_arrays.items():
        np.testing.assert_array_equal(value, empty[name])
    negative = load_pipeline(SampleConfig(model=video_run, out=tmp_path, negative_prompt="blurry, static"))
    expected = negative.text_encoders.encode(["blurry, static"])[0]
    assert set(negative.uncond_arrays) == set(expected)
    for name, value in negative.uncond_arrays.items():
        np.testing.assert_array_equal(value, expected[name])
        assert value.shape != empty[name].shape or not np.array_equal(value, empty[name])


# --------------------------------------------------------------------------- determinism


def test_seeds_and_batch_size(image_run, video_pipe, tmp_path):
    prompts = ["a red fox", "a blue car"]
    run = lambda name, **kw: sample(  # noqa: E731
        SampleConfig(
            model=image_run, out=tmp_path / name, prompts=prompts, steps=2, scheduler="ddpm", cfg_scale=3, **kw
        )
    )
    first, again = run("a", seed=5, batch_size=2), run("b", seed=5, batch_size=2)
    assert [s.pixels_sha256 for s in first.samples] == [s.pixels_sha256 for s in again.samples]
    other = run("c", seed=6, batch_size=2)
    assert all(x.pixels_sha256 != y.pixels_sha256 for x, y in zip(first.samples, other.samples))
    assert [s.seed for s in other.samples] == [6, 7]  # seed + prompt index

    single = run("d", seed=5, batch_size=1)
    for x, y in zip(first.samples, single.samples):
        a, b = read_png(x.files[0]).astype(int), read_png(y.files[0]).astype(int)
        # same noise and prompt; only float rounding of another batch shape may move a pixel by one level
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01

    # and for videos at the latent level, through the same per-prompt seeds, batch 1 vs batch 2
    batched = video_pipe.generate(prompts, [sample_seed(5, i) for i in range(2)], video_generation(2, "ddpm", 7.5, 1.1))
    for i, prompt in enumerate(prompts):
        alone = video_pipe.generate([prompt], [sample_seed(5, i)], video_generation(2, "ddpm", 7.5, 1.1))
        assert_close(alone.latents[0], batched.latents[i])
    assert (batched.latents[0] - batched.latents[1]).abs().max() > 0.1 * batched.latents.abs().max()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seed", str(2**64)], "--seed must be in [0, 2^63)"),
        (["--seed", "-1"], "--seed must be in [0, 2^63)"),
        (["--resolution", "0"], "--resolution must be at least 1, got 0"),
        (["--resolution", "-16"], "--resolution must be at least 1, got -16"),
        (["--frames", "0"], "--frames must be at least 1, got 0"),
        (["--out", "{tmp}/cat.png"], "names a file, but it is the folder the samples and their sidecars are"),
    ],
)
def test_bad_sampling_options_are_refused_before_anything_loads(video_run, tmp_path, options, message):
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    out = ["--out", str(tmp_path / "o")] if "--out" not in options else []
    result = run_cli("--model", video_run, "--prompt", "x", *out, *options)
    assert result.exit_code == 2 and message in result.text and "Traceback" not in result.text, result.text
    assert "loading model" not in result.text and not (tmp_path / "cat.png").exists()


def test_two_samplers_never_write_one_folder(video_run, tmp_path):
    """A second `gentron sample` into a folder another one is writing is refused instead of mixing their files."""
    from pipelines.locking import folder_lock

    (tmp_path / "o").mkdir()
    with folder_lock(tmp_path / "o", "samples folder"):
        result = run_cli("--model", video_run, "--prompt", "x", "--steps", "1", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "is in use by" in result.text, result.text
    assert not list((tmp_path / "o").glob("*.json"))
    assert run_cli("--model", video_run, "--prompt", "x", "--steps", "1", "--out", tmp_path / "o").exit_code == 0


def test_a_model_config_with_settings_of_a_newer_version_is_refused_by_name(video_run, tmp_path):
    """Unknown architecture keys may change the maths: refused, named, instead of diffusers' generic warning."""
    folder = tmp_path / "newer"
    shutil.copytree(video_run / "model", folder)
    config = json.loads((folder / "config.json").read_text()) | {"qk_norm": True, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("--model", folder, "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "qk_norm, rope_theta" in result.text and "Traceback" not in result.text


def test_errors_exit_2_with_a_clear_message(video_run, image_run, tmp_path):
    result = run_cli("--model", tmp_path / "nowhere", "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "model not found" in result.text and "nowhere" in result.text

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--model", empty, "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no model in" in result.text

    bare = tmp_path / "bare"  # weights' config but no pipeline.json: the encoders and VAE are unknown
    bare.mkdir()
    (bare / "config.json").write_text((video_run / "model" / "config.json").read_text())
    result = run_cli("--model", bare, "--prompt", "x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "pipeline.json not found" in result.text and str(bare) in result.text

    result = run_cli("--model", video_run, "--prompts", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "prompts file not found" in result.text and "missing.txt" in result.text

    result = run_cli("--model", image_run, "--prompt", "x", "--frames", 4, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no temporal layers" in result.text

    result = run_cli("--model", image_run, "--prompt", "x", "--mfg", 1.2, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "needs a video" in result.text

    # a T5 of another width than the model was trained with
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    wide_t5 = tmp_path / "wide_t5"
    ByT5Tokenizer().save_pretrained(wide_t5)
    T5EncoderModel(
        T5Config(vocab_size=384, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2, is_encoder_decoder=False)
    ).save_pretrained(wide_t5)
    result = run_cli("--model", video_run, "--prompt", "x", "--t5", wide_t5, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "width 48" in result.text and "trained with width 32" in result.text

    result = run_cli("--model", video_run, "--prompt", "x", "--resolution", 15, "--out", tmp_path / "o")
    message = " ".join(result.text.split())
    assert result.exit_code == 2 and "15x15 pixels" in message and "height 16 and width 16" in message

    not_sidecar = tmp_path / "notes.json"
    not_sidecar.write_text("{}")
    result = run_cli("--from-sidecar", not_sidecar, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a gentron sample sidecar" in result.text

    result = run_cli("--model", video_run, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--prompt" in result.text
    assert "Traceback" not in result.text
