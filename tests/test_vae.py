"""The VAE wrapper: pixel identity, tiny AutoencoderKL against direct diffusers calls, crop/resize, loading errors."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pipelines.encode.latents import CoverCrop
from pipelines.errors import GentronError
from pipelines.model.tiny import build_tiny_vae
from pipelines.model.vae import PixelVAE, load_vae


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return build_tiny_vae(tmp_path_factory.mktemp("tiny") / "vae", seed=0, downsample=8)


def _frames(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_pixel_vae_round_trip_is_exact_through_float16():
    vae = load_vae("pixel")
    assert isinstance(vae, PixelVAE)
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (3, 1, 1.0)
    frames = _frames(3, 8, 6)
    frames[0, 0, 0] = [0, 255, 128]  # the extremes must survive too
    mean, std = vae.encode(frames)
    assert mean.shape == (3, 3, 8, 6) and float(mean.min()) >= -1.0 and float(mean.max()) <= 1.0
    assert torch.equal(std, torch.zeros_like(std))
    stored = mean.numpy().astype(np.float16)  # as the shard keeps it
    np.testing.assert_array_equal(vae.decode(torch.from_numpy(stored)), frames)


def test_tiny_vae_matches_direct_diffusers_calls(tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir), device="cpu")
    direct = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    assert (vae.latent_channels, vae.downsample) == (4, 8)
    assert vae.scaling_factor == direct.config.scaling_factor
    frames = _frames(2, 32, 48, seed=1)
    mean, std = vae.encode(frames)
    assert mean.shape == (2, 4, 4, 6)
    with torch.no_grad():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = direct.encode(x).latent_dist
        torch.testing.assert_close(mean, posterior.mean * direct.config.scaling_factor)
        torch.testing.assert_close(std, posterior.std * direct.config.scaling_factor)
        assert float(std.min()) > 0
        decoded = vae.decode(mean)
        expected = direct.decode(posterior.mean).sample
    expected = ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1  # float rounding at .5 only


def test_tiny_vae_is_deterministic_per_seed(tmp_path, tiny_vae_dir):
    again = build_tiny_vae(tmp_path / "again", seed=0)
    other = build_tiny_vae(tmp_path / "other", seed=1)
    name = "diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (tiny_vae_dir / name).read_bytes()
    assert (other / name).read_bytes() != (tiny_vae_dir / name).read_bytes()
    assert load_vae(str(build_tiny_vae(tmp_path / "two", downsample=2))).downsample == 2


def test_subfolder_spec_and_model_folder_with_vae_subfolder(tiny_vae_dir):
    model_folder = tiny_vae_dir.parent  # holds vae/ and no config.json, like a diffusers pipeline folder
    reference = load_vae(str(tiny_vae_dir)).encode(_frames(1, 16, 16))[0]
    for spec in (f"{model_folder}:vae", str(model_folder)):
        torch.testing.assert_close(load_vae(spec).encode(_frames(1, 16, 16))[0], reference)


def test_missing_local_vae_is_a_clear_error_without_hub_access(tmp_path):
    with pytest.raises(GentronError) as err:
        load_vae(str(tmp_path / "no_such_vae"))
    assert "no_such_vae" in err.value.message and "not found" in err.value.message
    with pytest.raises(GentronError) as err:
        load_vae(str(tmp_path))  # exists, but holds no model
    assert str(tmp_path) in err.value.message


def test_hub_name_offline_says_not_found_locally_and_not_downloadable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GentronError) as err:
        load_vae("no-such-owner/no-such-vae")
    assert "no-such-owner/no-such-vae" in err.value.message
    assert "not found locally and could not be downloaded" in err.value.message


def test_center_crop_resize_keeps_the_middle_of_a_wide_frame():
    # Columns numbered 0..W-1: after resizing 32x64 -> 16x32 and a center crop of 16, the kept
    # columns are the middle half of the original (8..23 of each resized row = 16..47 originally).
    columns = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    frame = np.repeat(columns[None, :, :, None], 3, axis=3)
    out, crop = CoverCrop.square(16)(frame)
    assert out.shape == (1, 16, 16, 3)
    assert crop == {"mode": "center", "source_size": [32, 64], "resized_size": [16, 32], "top": 0, "left": 8}
    row = out[0, 8, :, 0].astype(int)
    assert np.all(np.diff(row) > 0)  # still increasing left to right
    assert 4 * 16 <= row[0] <= 4 * 18 and 4 * 45 <= row[-1] <= 4 * 48
    tall = _frames(2, 20, 12)
    out, crop = CoverCrop.square(12)(tall)  # already the right short side: a pure crop, no resampling
    np.testing.assert_array_equal(out, tall[:, 4:16])
    assert crop["top"] == 4 and crop["resized_size"] == [20, 12]
