"""`gentron eval`: CLIP score, FID and the toy probe, checked against direct computations.

The models are tiny random ones saved to disk and loaded by path through the same code as the real ones
(`pipelines.model.tiny_eval`); the samples folders are written in `gentron sample`'s format (outputs +
sidecars, through pipelines.sample.outputs), from the toy dataset's ground truth.
"""

import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.media import decode_clip, encode_image
from pipelines.data.shards import ShardWriter, shard_name
from pipelines.errors import GentronError
from pipelines.evaluate.evaluator import (
    ClipScorer,
    FeatureMoments,
    clip_score_of,
    clip_scores,
    consecutive_similarity,
    fid,
    fid_between,
    frechet_distance,
    inception_features,
    list_samples,
    load_statistics,
    reference_statistics,
    sample_statistics,
)
from pipelines.model.fid_inception import FIDInceptionV3, load_fid_inception, resize_bilinear_tf1, save_fid_inception
from pipelines.model.tiny import build_tiny_clip
from pipelines.model.tiny_eval import build_tiny_clip_model, build_tiny_fid_inception
from pipelines.sample import outputs
from pipelines.toy.data import ToyDataConfig, make_toy_dataset

FRAMES = 4


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})  # no path folded mid-word


def write_samples(folder: Path, items: list[tuple[str, np.ndarray]], fps: float = 4.0) -> Path:
    """Outputs and sidecars as `gentron sample` writes them (the fields eval reads, and the usual others)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (prompt, pixels) in enumerate(items):
        stem = outputs.output_stem(index, prompt)
        files = outputs.write_sample(folder, stem, pixels, fps)
        frames = 1 if pixels.ndim == 3 else len(pixels)
        record = {
            "version": 1,
            "prompt": prompt,
            "index": index,
            "seed": 0,
            "sample_seed": index,
            "settings": {"frames": frames, "fps": fps},
            "files": [f.name for f in files],
            "pixels_sha256": outputs.pixels_sha256(pixels),
        }
        outputs.write_sidecar(folder / f"{stem}{outputs.SIDECAR_SUFFIX}", record)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """Ground-truth toy data as samples: 8 images and 8 four-frame videos with their captions."""
    root = tmp_path_factory.mktemp("toy")
    dirs = make_toy_dataset(root / "data", ToyDataConfig(images_per_combo=1, videos_per_combo=1, video_seconds=1.0))
    images = [
        (p.with_suffix(".txt").read_text(), np.asarray(Image.open(p).convert("RGB")))
        for p in sorted(dirs["images"].glob("*.png"))[::2]
    ]
    videos = []
    for p in sorted(dirs["videos"].glob("*.mp4"))[::2]:
        clip = decode_clip(p.read_bytes())
        videos.append(
            (p.with_suffix(".txt").read_text(), clip[np.linspace(0, len(clip) - 1, FRAMES).round().astype(int)])
        )
    return {
        "images": images,
        "videos": videos,
        "folder": write_samples(root / "samples", images + videos),
        "image_dir": dirs["images"],
    }


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> Path:
    return build_tiny_clip_model(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> Path:
    return build_tiny_fid_inception(tmp_path_factory.mktemp("inception") / "pt_inception-tiny.pth")


# --------------------------------------------------------------------------- CLIP score


def test_clip_score_is_100_times_the_clipped_cosine_by_hand(clip_model):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    frames = [image, *video]
    candidates = ["coffee", "a photo of a cat", "a dog running on the beach", "a bird", "red car", "two people walking"]

    # by hand: CLIPModel's own forward pass (its image_embeds and text_embeds), cosines in numpy
    model, processor = CLIPModel.from_pretrained(clip_model), CLIPProcessor.from_pretrained(clip_model)
    with torch.no_grad():
        out = model(
            **processor(text=candidates, images=[Image.fromarray(f) for f in frames], return_tensors="pt", padding=True)
        )
    img, txt = out.image_embeds.numpy().astype(np.float64), out.text_embeds.numpy().astype(np.float64)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    # the image with the prompt it is most like, the video with the one it is least like: both sides of the clipping
    image_prompt, video_prompt = int(cos[0].argmax()), int(cos[1:].sum(0).argmin())
    assert cos[0, image_prompt] > 0 and (cos[1:, video_prompt] < 0).any()
    expected_image = 100 * max(cos[0, image_prompt], 0)
    expected_video = np.mean(100 * np.maximum(cos[1:, video_prompt], 0))
    unit = img[1:] / np.linalg.norm(img[1:], axis=1, keepdims=True)

    scores = clip_scores(
        ClipScorer(str(clip_model), "cpu"), [image, video], [candidates[image_prompt], candidates[video_prompt]]
    )
    assert scores[0].clip_score == pytest.approx(expected_image, abs=1e-4)
    assert scores[0].temporal_consistency is None
    assert scores[1].clip_score == pytest.approx(expected_video, abs=1e-4)
    assert scores[1].temporal_consistency == pytest.approx(np.mean((unit[1:] * unit[:-1]).sum(1)), abs=1e-5)


def test_clip_score_and_consecutive_similarity_formulas():
    text = torch.tensor([1.0, 0.0])
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    assert clip_score_of(images, text).tolist() == pytest.approx([100.0, 60.0, 0.0])
    assert consecutive_similarity(images) == pytest.approx((0.6 - 0.6) / 2)
    assert consecutive_similarity(images[:1]) is None


# --------------------------------------------------------------------------- Fréchet distance and FID


def test_frechet_distance_of_known_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # diagonal covariances: sum over dimensions of (s1 + s2 - 2 sqrt(s1 s2)) = sum (sqrt s1 - sqrt s2)^2
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # a full covariance and c^2 times it: sqrtm(S c^2 S) = c S, so the trace term is (1 - c)^2 tr S
    a = rng.normal(size=(d, d))
    sigma, c = a @ a.T, 1.7
    expected = ((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, c**2 * sigma) == pytest.approx(expected, rel=1e-10)
    # singular covariances (fewer samples than features), as FID on a small set has
    x = rng.normal(size=(3, d))
    singular = np.cov(x, rowvar=False)
    assert np.linalg.matrix_rank(singular) < d
    assert frechet_distance(mu1, singular, mu1, singular) == pytest.approx(0, abs=1e-9)
    scipy_linalg = pytest.importorskip("scipy.linalg")  # the usual formula, where scipy happens to be installed
    b = rng.normal(size=(d, d))
    other = b @ b.T
    usual = ((mu1 - mu2) ** 2).sum() + np.trace(sigma + other - 2 * scipy_linalg.sqrtm(sigma @ other).real)
    assert frechet_distance(mu1, sigma, mu2, other) == pytest.approx(usual, rel=1e-8)


def test_feature_moments_stream_to_numpy_mean_and_covariance():
    x = np.random.default_rng(1).normal(size=(50, 5))
    moments = FeatureMoments(5)
    for chunk in np.array_split(x, 4):
        moments.add(chunk)
    stats = moments.stats()
    assert stats.count == 50
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10)
    # shifting every feature by delta moves the distance by exactly |delta|^2
    shifted = FeatureMoments(5)
    shifted.add(x + 0.5)
    assert fid_between(stats, stats) == pytest.approx(0, abs=1e-9)
    assert fid_between(stats, shifted.stats()) == pytest.approx(5 * 0.25, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_as_it_is_shifted(toy, inception):
    network = load_fid_inception(inception)  # the tiny network, loaded by path as the real file is
    samples = [pixels for _, pixels in toy["images"] + toy["videos"][:2]]
    reference = sample_statistics(network, samples)
    assert reference.count == len(toy["images"]) + FRAMES * 2  # videos: FID over frames
    values = [
        fid(network, [np.clip(s.astype(int) + shift, 0, 255).astype(np.uint8) for s in samples], reference)
        for shift in (0, 16, 32)
    ]
    assert values[0] == pytest.approx(0, abs=1e-6)
    assert 0 < values[1] < values[2]


def test_inception_matches_the_fid_weights_file_layout(tmp_path):
    with torch.device("meta"):  # the full network without allocating it
        full = FIDInceptionV3()
    state = full.state_dict()
    assert full.feature_dim == 2048
    assert (
        sum(p.numel() for p in full.parameters()) == 23_850_960
    )  # torchvision's Inception3 without AuxLogits, 1008 classes
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 94 * 5 + 2
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
        "fc.weight": (1008, 2048),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    # a tiny network saved either way loads back by path, its width read off the file
    tiny = FIDInceptionV3(width=1 / 32).eval()
    pixels = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    for name in ("weights.pth", "weights.safetensors"):
        loaded = load_fid_inception(save_fid_inception(tiny, tmp_path / name))
        assert loaded.width == 1 / 32 and loaded.feature_dim == 64
        torch.testing.assert_close(loaded(pixels), tiny(pixels))


def test_resize_is_tensorflow_1_bilinear():
    # output pixel i reads input position i * in / out, clamped at the last pixel
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = resize_bilinear_tf1(x, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    torch.testing.assert_close(out[0, 0, 1, 1], torch.tensor(15.0))
    # pixel by pixel, as torch-fidelity writes it (columns blended, then rows), down and up
    image = torch.randint(0, 256, (1, 1, 7, 5)).float()
    for size in (3, 11):
        out, h, w = resize_bilinear_tf1(image, size)[0, 0], 7, 5
        for i in range(size):
            for j in range(size):
                y, x = np.float32(i) * np.float32(h / size), np.float32(j) * np.float32(w / size)
                y0, x0 = int(y), int(x)
                y1, x1, dy, dx = min(y0 + 1, h - 1), min(x0 + 1, w - 1), y - np.float32(y0), x - np.float32(x0)
                p = image[0, 0].numpy()
                top = p[y0, x0] + (p[y0, x1] - p[y0, x0]) * dx
                bottom = p[y1, x0] + (p[y1, x1] - p[y1, x0]) * dx
                assert out[i, j].item() == pytest.approx(float(top + (bottom - top) * dy), abs=1e-4), (size, i, j)


def test_reference_folder_shards_and_npz_give_the_same_statistics(toy, inception, tmp_path):
    network = load_fid_inception(inception)
    images = [pixels for _, pixels in toy["images"]]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    shards = tmp_path / "shards"
    shards.mkdir()
    with ShardWriter(shards / f"{shard_name(0)}.tar") as writer:
        for i, pixels in enumerate(images):
            writer.write(f"img{i:03d}", {schema.IMAGE_PNG: encode_image(pixels, "png"), schema.CAPTION: b"x"})
    from_folder = reference_statistics(folder, network)
    from_shards = reference_statistics(shards, network)
    direct = FeatureMoments(network.feature_dim)
    direct.add(inception_features(network, images))
    for stats in (from_folder, from_shards):
        assert stats.count == len(images)
        np.testing.assert_allclose(stats.mu, direct.stats().mu, rtol=1e-6)
        np.testing.assert_allclose(stats.sigma, direct.stats().sigma, rtol=1e-6, atol=1e-9)

    # the CLI caches the statistics, and the cached file gives the same FID
    samples = write_samples(tmp_path / "samples", toy["images"][:2] + toy["videos"][:1])
    first = run_cli(
        "eval",
        samples,
        "--reference",
        folder,
        "--inception",
        inception,
        "--save-reference",
        tmp_path / "ref.npz",
        "--out",
        tmp_path / "a.json",
    )
    assert first.exit_code == 0, first.output
    cached = load_statistics(tmp_path / "ref.npz")
    assert cached.count == len(images) and cached.inception_sha256
    second = run_cli(
        "eval", samples, "--reference", tmp_path / "ref.npz", "--inception", inception, "--out", tmp_path / "b.json"
    )
    assert second.exit_code == 0, second.output
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["fid"] for n in "ab")
    assert a["value"] > 0 and a["value"] == pytest.approx(b["value"], rel=1e-9)
    assert a["frames"] == 2 + FRAMES and a["reference_count"] == b["reference_count"] == len(images)
    # statistics of another network are refused
    other = build_tiny_fid_inception(tmp_path / "other.pth", seed=1)
    third = run_cli("eval", samples, "--reference", tmp_path / "ref.npz", "--inception", other)
    assert third.exit_code == 2 and "another Inception weights file" in third.output


# --------------------------------------------------------------------------- the command


def test_eval_command_writes_every_metric(toy, clip_model, inception, tmp_path):
    out = tmp_path / "metrics.json"
    result = run_cli(
        "eval",
        toy["folder"],
        "--clip",
        clip_model,
        "--reference",
        toy["image_dir"],
        "--inception",
        inception,
        "--probe",
        "toy",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["samples"] | {"folder": None} == {
        "folder": None,
        "count": 16,
        "images": 8,
        "videos": 8,
        "frames": 40,
    }
    assert "CLIP score" in result.output and "FID" in result.output and "toy probe: direction" in result.output

    # ground-truth toy samples follow their prompts every time
    assert metrics["probe"]["rates"] == {"color": 1.0, "place": 1.0, "direction": 1.0, "axis": 1.0}
    assert metrics["probe"]["counts"] == {"color": 16, "place": 8, "direction": 8, "axis": 8}

    # the numbers are those of the library functions on the same pixels
    samples = list_samples(toy["folder"])
    pixels, prompts = [s.read_pixels() for s in samples], [s.prompt for s in samples]
    for original, read in zip(toy["images"] + toy["videos"], pixels):
        np.testing.assert_array_equal(original[1], read)  # videos read exactly, from the film strip
    scores = clip_scores(ClipScorer(str(clip_model), "cpu"), pixels, prompts)
    assert metrics["clip"]["score"] == pytest.approx(np.mean([s.clip_score for s in scores]), abs=1e-5)
    assert metrics["clip"]["temporal_consistency"] == pytest.approx(
        np.mean([s.temporal_consistency for s in scores[8:]]), abs=1e-6
    )
    assert [r["clip_score"] for r in metrics["per_sample"]] == pytest.approx([s.clip_score for s in scores], abs=1e-5)
    network = load_fid_inception(inception)
    reference = reference_statistics(toy["image_dir"], network)
    assert metrics["fid"]["value"] == pytest.approx(fid(network, pixels, reference), rel=1e-6)
    assert metrics["fid"]["reference_count"] == 16 and metrics["notes"]  # few samples: the bias is noted

    # metrics.json written into the samples folder is not taken for a sample on the next run
    again = run_cli("eval", toy["folder"], "--probe", "toy")
    assert again.exit_code == 0, again.output
    assert (toy["folder"] / "metrics.json").is_file()
    assert run_cli("eval", toy["folder"], "--probe", "toy").exit_code == 0


def test_help_lists_eval():
    result = run_cli("--help")
    assert result.exit_code == 0 and " eval " in result.output


def test_errors_exit_2_with_one_clear_message(toy, clip_model, inception, tmp_path, monkeypatch):
    def fails(*args, says: str):
        result = run_cli("eval", *args)
        assert result.exit_code == 2, result.output
        assert says in result.output and "fix:" in result.output and "Traceback" not in result.output, result.output

    folder = toy["folder"]
    fails(folder, says="no metric asked for")
    fails(tmp_path / "nowhere", "--probe", "toy", says=f"samples folder not found: {tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "--probe", "toy", says=f"no samples in {tmp_path / 'empty'}")
    fails(folder, "--clip", tmp_path / "no-clip", says=f"CLIP model not found: {tmp_path / 'no-clip'}")
    fails(folder, "--clip", toy["image_dir"], says=f"cannot load the CLIP model from {toy['image_dir']}")
    text_only = build_tiny_clip(tmp_path / "text-only-clip")  # the encoders' CLIP: a text tower only
    fails(
        folder, "--clip", text_only, says="holds a 'clip_text_model' model, not a CLIP model with text and image towers"
    )
    fails(
        folder,
        "--reference",
        toy["image_dir"],
        "--inception",
        tmp_path / "none.pth",
        says=f"FID Inception weights not found: {tmp_path / 'none.pth'}",
    )
    fails(folder, "--reference", toy["image_dir"], says="FID needs both --reference and --inception")
    fails(
        folder,
        "--reference",
        tmp_path / "no-ref",
        "--inception",
        inception,
        says=f"FID reference not found: {tmp_path / 'no-ref'}",
    )
    fails(folder, "--probe", "coco", says="unknown --probe 'coco'")

    # a sample without a sidecar, and a prompt the toy probe cannot read
    orphan = write_samples(tmp_path / "orphan", [toy["images"][0], ("a photo of a cat", toy["images"][1][1])])
    sidecar = next(orphan.glob("0000_*.json"))
    sidecar.unlink()
    fails(orphan, "--probe", "toy", says=f"sample without a sidecar: {sidecar.with_suffix('.png')}")
    not_toy = write_samples(tmp_path / "cat", [("a photo of a cat", toy["images"][1][1])])
    fails(not_toy, "--probe", "toy", says="--probe toy scores toy captions only")

    # a hub name that is not on disk and cannot be fetched
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GentronError) as err:
        ClipScorer("no-such-owner/no-such-clip", "cpu")
    assert "'no-such-owner/no-such-clip' not found locally and could not be downloaded" in err.value.message
