"""VAE families: each tiny random video VAE, saved by path in the diffusers layout and loaded through `load_vae`,
against direct diffusers calls normalised by the family's own formula (written out here, independently of the
adapters); frame rules, causality, frames per call, slicing and tiling; the pixel video latent."""

import json

import diffusers
import numpy as np
import pytest
import torch

from pipelines.errors import GentronError
from pipelines.model.tiny import TINY_VIDEO_VAE_FAMILIES, build_tiny_video_vae
from pipelines.model.vae import FrameRule, Normalisation, PixelVideoVAE, load_vae

# family -> (diffusers class, adapter family name, latent channels, spatial, temporal, frame rule)
EXPECTED = {
    "wan": ("AutoencoderKLWan", "wan", 16, 8, 4, "4k+1"),
    "wan2.2": ("AutoencoderKLWan", "wan", 12, 16, 4, "4k+1"),
    "cogvideox": ("AutoencoderKLCogVideoX", "cogvideox", 4, 8, 4, "8k+1"),
    "hunyuanvideo": ("AutoencoderKLHunyuanVideo", "hunyuanvideo", 4, 8, 4, "4k+1"),
    "ltx": ("AutoencoderKLLTXVideo", "ltx", 8, 8, 8, "8k+1"),
}


def normalised_by_formula(family: str, model, mean: torch.Tensor, std: torch.Tensor):
    """Each family's normalisation as its diffusers pipelines write it, on (B, C, T, h, w) posteriors."""
    cfg = model.config
    if family in ("wan", "wan2.2"):
        m = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        s = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        return (mean - m) / s, std / s
    if family in ("cogvideox", "hunyuanvideo"):
        return mean * cfg.scaling_factor, std * cfg.scaling_factor
    m, s = model.latents_mean.view(1, -1, 1, 1, 1), model.latents_std.view(1, -1, 1, 1, 1)
    return (mean - m) * cfg.scaling_factor / s, std * cfg.scaling_factor / s


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_vaes")
    return {family: build_tiny_video_vae(root / family, family, seed=0) for family in TINY_VIDEO_VAE_FAMILIES}


def _clip(frames, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)


def _pixels(clips: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) in [-1, 1], as the diffusers pipelines feed a video VAE."""
    return torch.from_numpy(np.array(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


@pytest.mark.parametrize("family", TINY_VIDEO_VAE_FAMILIES)
def test_family_latents_equal_direct_diffusers_encode_normalised_by_its_formula(vae_dirs, family):
    folder = vae_dirs[family]
    class_name, name, channels, spatial, temporal, rule = EXPECTED[family]
    assert json.loads((folder / "config.json").read_text())["_class_name"] == class_name
    vae = load_vae(str(folder), device="cpu")
    direct = getattr(diffusers, class_name).from_pretrained(folder).eval()
    assert (vae.family, vae.latent_channels, vae.downsample, vae.frame_rule.temporal) == (
        name,
        channels,
        spatial,
        temporal,
    )
    assert vae.frame_rule.describe() == rule and vae.video
    step = vae.frame_rule.step
    clips = np.stack([_clip(1 + 2 * step, seed=1), _clip(1 + 2 * step, seed=2)])
    (mean0, std0), (mean1, std1) = vae.encode_clips(list(clips))
    with torch.no_grad():
        posterior = direct.encode(_pixels(clips)).latent_dist
    want_mean, want_std = normalised_by_formula(family, direct, posterior.mean, posterior.std)
    got_mean = torch.stack([mean0, mean1]).permute(0, 2, 1, 3, 4)  # (B, t, C, h, w) -> (B, C, t, h, w)
    got_std = torch.stack([std0, std1]).permute(0, 2, 1, 3, 4)
    assert got_mean.shape == (2, channels, vae.frame_rule.latent_frames(1 + 2 * step), 16 // spatial, 16 // spatial)
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_std, want_std, rtol=1e-4, atol=1e-5)
    assert float(want_mean.std()) > 0 and not torch.allclose(want_mean, posterior.mean, atol=1e-3)  # really normalised

    # decoding denormalises by the same formula and gives back the clip's own frame count
    decoded = vae.decode_clips(torch.stack([mean0, mean1]))
    with torch.no_grad():
        raw = posterior.mean
        if family == "ltx":  # timestep-conditioned decoder: decoded at timestep 0, the adapter's recorded option
            assert vae.decode_options == {"timestep": 0.0}
            expected = direct.decode(raw, torch.zeros(2)).sample
        else:
            expected = direct.decode(raw).sample
    expected = ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert decoded.shape == clips.shape
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("family", TINY_VIDEO_VAE_FAMILIES)
def test_family_frame_rule_image_latent_and_round_trip_of_the_normalisation(vae_dirs, family):
    vae = load_vae(str(vae_dirs[family]), device="cpu")
    rule = vae.frame_rule
    for frames in (1, 1 + rule.step, 1 + 2 * rule.step):  # every valid length decodes back to itself
        ((mean, _),) = vae.encode_clips([_clip(frames)])
        assert mean.shape[0] == rule.latent_frames(frames)
        assert vae.decode_clips(mean[None]).shape[1] == frames == rule.decoded_frames(mean.shape[0])
    with pytest.raises(ValueError):
        vae.encode_clips([_clip(8)])  # 8 breaks 4k+1 and 8k+1 alike
    with pytest.raises(GentronError) as err:
        rule.check(8, "clip x", vae.name)
    assert rule.describe() in err.value.message and "--frames 9" in err.value.hint

    # normalise then denormalise is the identity
    z = torch.randn(2, vae.latent_channels, 3, 2, 2)
    torch.testing.assert_close(vae.normalisation.denormalise(vae.normalisation.normalise(z)), z, rtol=1e-5, atol=1e-6)

    # an image is one latent frame; for the causal families it equals the first latent frame of a clip opening with it
    clip = _clip(1 + rule.step, seed=3)
    image_mean, _ = vae.encode(clip[:1])
    ((clip_mean, _),) = vae.encode_clips([clip])
    assert image_mean.shape == (1, *clip_mean.shape[1:]) and image_mean.shape[1] == vae.latent_channels
    gap = float((image_mean[0] - clip_mean[0]).abs().max())
    if vae.causal:
        assert gap < 1e-5
    else:  # CogVideoX and HunyuanVideo pool GroupNorm statistics over the clip's frames: recorded as not causal
        assert gap > 1e-3
    assert vae.record()["causal"] == (family not in ("cogvideox", "hunyuanvideo"))


def test_frames_per_call_slicing_and_tiling_keep_the_values(vae_dirs):
    vae = load_vae(str(vae_dirs["wan"]), device="cpu")
    calls = []
    inner = vae._encode_call
    vae._encode_call = lambda clips: calls.append(clips.shape) or inner(clips)
    clips = [_clip(5, seed=s) for s in range(3)] + [_clip(1, seed=9), _clip(5, size=24, seed=4)]
    together = vae.encode_clips(clips)
    assert calls == [(3, 5, 16, 16, 3), (1, 1, 16, 16, 3), (1, 5, 24, 24, 3)]  # one call per run of one shape
    calls.clear()
    apart = vae.encode_clips(clips, frames_per_call=10)  # two 5-frame clips per call, never a clip split
    assert calls == [(2, 5, 16, 16, 3), (1, 5, 16, 16, 3), (1, 1, 16, 16, 3), (1, 5, 24, 24, 3)]
    for (a, sa), (b, sb) in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5)

    sliced = load_vae(str(vae_dirs["wan"]), device="cpu", slicing=True)
    assert sliced.model.use_slicing and sliced.record()["slicing"] and not sliced.record()["tiling"]
    for (a, _), (b, _) in zip(together, sliced.encode_clips(clips)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    tiled = load_vae(str(vae_dirs["wan"]), device="cpu", tiling=True)
    assert tiled.model.use_tiling and tiled.record()["tiling"]
    with pytest.raises(GentronError, match="do not apply"):
        load_vae("pixel-video", tiling=True)


def test_image_vae_splits_frames_by_frames_per_call(tmp_path):
    from pipelines.model.tiny import build_tiny_vae

    vae = load_vae(str(build_tiny_vae(tmp_path / "sd", downsample=2)), device="cpu")
    assert (vae.family, vae.frame_rule, vae.video) == ("sd", FrameRule(), False)
    calls = []
    inner = vae._encode_call
    vae._encode_call = lambda clips: calls.append(clips.shape[0]) or inner(clips)
    clips = [_clip(8, seed=1), _clip(1, seed=2), _clip(8, seed=3)]  # an image VAE takes 8 frames (any count)
    together = vae.encode_clips(clips)
    assert calls == [17] and [m.shape[0] for m, _ in together] == [8, 1, 8]
    calls.clear()
    apart = vae.encode_clips(clips, frames_per_call=5)
    assert calls == [5, 5, 5, 2]
    for (a, _), (b, _) in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_folder_of_another_class_is_refused_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(GentronError) as err:
        load_vae(str(tmp_path))
    assert "UNet2DModel" in err.value.message and "wan" in err.value.hint and "pixel-video" in err.value.hint


def test_pixel_video_latent_packs_four_frames_into_channels_and_is_invertible():
    vae = load_vae("pixel-video")
    assert isinstance(vae, PixelVideoVAE)
    assert (vae.latent_channels, vae.downsample, vae.frame_rule.describe(), vae.causal) == (12, 1, "4k+1", True)
    clip = _clip(9, size=6, seed=5)
    clip[0, 0, 0] = [0, 255, 128]
    ((mean, std),) = vae.encode_clips([clip])
    assert mean.shape == (3, 12, 6, 6) and torch.equal(std, torch.zeros_like(std))
    pixels = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
    torch.testing.assert_close(mean[0, :3], pixels[0])  # the first frame alone, zeros beside it
    assert not mean[0, 3:].any()
    for f in range(4):
        torch.testing.assert_close(mean[1, 3 * f : 3 * f + 3], pixels[1 + f])  # then frames 1-4, 5-8
        torch.testing.assert_close(mean[2, 3 * f : 3 * f + 3], pixels[5 + f])
    stored = torch.from_numpy(mean.numpy().astype(np.float16))  # as the shard keeps it
    np.testing.assert_array_equal(vae.decode_clips(stored[None])[0], clip)
    image_mean, _ = vae.encode(clip[:1])
    torch.testing.assert_close(image_mean[0], mean[0])
    np.testing.assert_array_equal(vae.decode(image_mean), clip[:1])
    with pytest.raises(ValueError):
        vae.encode_clips([clip[:8]])


def test_frame_rule_arithmetic_and_records():
    wan, ltx, image = FrameRule(4, 4), FrameRule(8, 8), FrameRule()
    assert [wan.latent_frames(n) for n in (1, 5, 9, 17)] == [1, 2, 3, 5]
    assert [ltx.latent_frames(n) for n in (1, 9, 17)] == [1, 2, 3]
    assert wan.suggestions(8) == (9, 5) and ltx.suggestions(8) == (9, 17) and wan.suggestions(10) == (13, 9)
    assert image.ok(8) and image.latent_frames(8) == 8 and image.describe() == "any"
    cog = FrameRule(4, 8)
    assert not cog.ok(5) and cog.ok(9) and cog.latent_frames(9) == 3 and cog.decoded_frames(3) == 9
    assert FrameRule.from_record(cog.record()) == cog and FrameRule.from_record({}) == image
    norm = Normalisation("(z - mean) / std", (0.5, -1.0), (2.0, 0.25))
    assert Normalisation.from_record(json.loads(json.dumps(norm.record()))) == norm
    z = torch.tensor([[1.0, 1.0]]).view(1, 2, 1)
    torch.testing.assert_close(norm.normalise(z), torch.tensor([[1.0, 0.5]]).view(1, 2, 1))


# ---------------------------------------------------------------------------------------------
# encode-latents with each family


def _moving(frames: int, seed: int, size: int = 16) -> np.ndarray:
    """Smooth moving gradients (they survive Motion-JPEG well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = rng.uniform(0, 2 * np.pi, size=3)
    out = [np.stack([127 + 100 * np.sin(x / 5 + y / 7 + i / 2 + base[c]) for c in range(3)], -1) for i in range(frames)]
    return np.stack(out).astype(np.uint8)


def _input_shard(folder, clips: dict[str, int], images: tuple[str, ...] = ()):
    from pipelines.data import media, schema
    from pipelines.data.shards import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder / "000000.tar") as writer:
        for i, (key, frames) in enumerate(clips.items()):
            meta = schema.encode_json({"prep": {"index": i}})
            writer.write(key, {schema.VIDEO: media.encode_clip(_moving(frames, i), fps=4), schema.META: meta})
        for i, key in enumerate(images):
            image = media.encode_image(_moving(1, 100 + i)[0], fmt="png")
            writer.write(key, {schema.IMAGE_PNG: image, schema.META: schema.encode_json({"prep": {}})})
    return folder


@pytest.mark.parametrize("family", TINY_VIDEO_VAE_FAMILIES)
def test_encode_latents_stores_each_familys_normalised_posterior_and_records_it(tmp_path, vae_dirs, family):
    from pipelines.data import media, schema
    from pipelines.data.shards import iter_shard
    from pipelines.encode.latents import EncodeLatentsConfig, encode_latents

    class_name, name, channels, spatial, temporal, rule = EXPECTED[family]
    folder = vae_dirs[family]
    frames = 9 if rule == "4k+1" else 17
    inp = _input_shard(tmp_path / "in", {"c0": frames, "c1": frames}, images=("i0",))
    cfg = EncodeLatentsConfig(inp, tmp_path / "out", vae=str(folder), resolution=16, batch_size=3, device="cpu")
    result = encode_latents(cfg)
    assert (result.samples_out, result.failed) == (3, 0)
    direct = getattr(diffusers, class_name).from_pretrained(folder).eval()
    for _key, fields in iter_shard(tmp_path / "out" / "000000.tar"):
        is_clip = schema.VIDEO in fields
        pixels = media.decode_clip(fields[schema.VIDEO]) if is_clip else media.decode_image(fields["png"])[None]
        with torch.no_grad():
            posterior = direct.encode(_pixels(pixels[None])).latent_dist
        want_mean, want_std = (
            v[0].permute(1, 0, 2, 3) for v in normalised_by_formula(family, direct, posterior.mean, posterior.std)
        )
        stored_mean = schema.decode_npy(fields[schema.LATENT_MEAN])
        stored_std = schema.decode_npy(fields[schema.LATENT_STD])
        latent_frames = 1 + (frames - 1) // temporal if is_clip else 1
        assert stored_mean.dtype == np.float16
        assert stored_mean.shape == ((latent_frames,) if is_clip else ()) + (channels, 16 // spatial, 16 // spatial)
        if not is_clip:
            stored_mean, stored_std = stored_mean[None], stored_std[None]
        np.testing.assert_allclose(stored_mean.astype(np.float32), want_mean.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored_std.astype(np.float32), want_std.numpy(), rtol=2e-3, atol=2e-3)
        latent = schema.decode_json(fields[schema.META])["latent"]
        assert (latent["family"], latent["channels"], latent["downsample"], latent["temporal_downsample"]) == (
            name,
            channels,
            spatial,
            temporal,
        )
        assert latent["frame_rule"] == rule and latent["slicing"] is False and latent["tiling"] is False
        assert (latent["frames"], latent["latent_frames"], latent["decoded_frames"]) == (
            (frames, latent_frames, frames) if is_clip else (1, 1, 1)
        )
        assert Normalisation.from_record(latent["normalisation"]) == load_vae(str(folder)).normalisation


def test_encode_latents_refuses_clips_breaking_the_frame_rule_with_the_frames_to_use(tmp_path, vae_dirs):
    from typer.testing import CliRunner

    from gentron_cli.main import app
    from pipelines.data.shards import ShardStats
    from pipelines.encode.latents import EncodeLatentsConfig, encode_latents

    paper = _input_shard(tmp_path / "paper", {"c0": 8, "c1": 8})  # the paper's 8 frames
    with pytest.raises(GentronError) as err:
        encode_latents(EncodeLatentsConfig(paper, tmp_path / "out", vae=str(vae_dirs["wan"]), resolution=16))
    assert "c0" in err.value.message and "4k+1" in err.value.message and "decode to 5" in err.value.message
    assert "prep-videos --frames 9" in err.value.hint
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing encoded, nothing truncated
    result = CliRunner().invoke(
        app,
        ["encode-latents", str(paper), "-o", str(tmp_path / "cli"), "--vae", "pixel-video", "--resolution", "16"],
        env={"COLUMNS": "1000"},
    )
    assert result.exit_code == 2 and "4k+1" in result.output and "--frames 9" in result.output
    assert "Traceback" not in result.output

    # one odd clip among good ones: skipped and named in the stats, the rest encoded
    mixed = _input_shard(tmp_path / "mixed", {"c0": 9, "odd": 8, "c2": 9})
    result = encode_latents(EncodeLatentsConfig(mixed, tmp_path / "out2", vae="pixel-video", resolution=16))
    assert (result.samples_out, result.summary["failures_by_reason"]) == (2, {"frames_break_vae_rule": 1})
    stats = ShardStats.load(next((tmp_path / "out2").glob("*.stats.json")))
    assert [f.key for f in stats.failures] == ["odd"] and "--frames 9" in stats.failures[0].detail
