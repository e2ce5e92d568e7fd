"""The image-to-video benchmark's probe inputs and scoring, on ground-truth toy clips (no training)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.image import resize_image
from pipelines.sample.given import read_video_frames

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_load("bench_learning")
bench = _load("bench_i2v")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The probe inputs, and each prompt's ground-truth clip (8 frames at 4 FPS) at the training size."""
    root = tmp_path_factory.mktemp("probe")
    inputs = bench.make_probe_inputs(root, bench.learning.DATA)
    clips = {}
    for path in sorted((root / "raw" / "videos").glob("*.mp4")):
        frames = read_video_frames(path, bench.CLIP_FPS)[: bench.learning.FRAMES]
        caption = path.with_suffix(".txt").read_text().strip()
        clips[caption] = np.stack([resize_image(f, bench.learning.SIZE, crop=True)[0] for f in frames])
    return inputs, clips


def test_probe_inputs_cover_every_prompt_with_the_start_of_its_video(probe):
    inputs, clips = probe
    prompts = bench.prompts()
    assert len(prompts) == 48 and set(inputs["image"]) == set(inputs["video"]) == set(clips) == set(prompts)
    assert sum(bench.learning.is_held_out(p) for p in prompts) == 8  # the held-out pairs are probed too
    for prompt in prompts[:4]:
        with Image.open(inputs["image"][prompt]) as im:
            image = np.asarray(im.convert("RGB"))
        start = read_video_frames(inputs["video"][prompt], bench.CLIP_FPS)
        assert image.shape == (64, 64, 3) and len(start) == 2
        first = resize_image(image, bench.learning.SIZE, crop=True)[0]
        assert np.abs(first.astype(int) - clips[prompt][0]).mean() < 3  # the clip's first frame
    # drawn with another seed than the training data: other paths
    assert replace(bench.learning.DATA, seed=bench.PROBE_SEED).seed != bench.learning.DATA.seed


def test_ground_truth_scores_perfectly_and_each_fault_fails_its_attribute(probe):
    _, clips = probe
    for prompt, clip in clips.items():
        assert all(bench.score_i2v(prompt, clip).values()), prompt
        assert all(bench.score_continuation(prompt, clip).values()), prompt
        assert bench.speed_ratio(clip) == pytest.approx(1.0, abs=0.35)
    prompt = "a green square moving right"
    clip = clips[prompt]
    backwards = np.concatenate([clip[:1], clip[1:][::-1]])  # starts at the image, then jumps to the far end
    scores = bench.score_i2v(prompt, backwards)
    assert not scores["start"] and scores["color"] and scores["shape"]
    still = np.repeat(clip[:1], len(clip), axis=0)  # never moves
    assert not bench.score_i2v(prompt, still)["direction"] and bench.score_i2v(prompt, still)["start"]
    assert not bench.score_continuation(prompt, still)["direction"]
    red = clips["a red circle moving up"].copy()
    red[1:] = red[1:][..., [2, 1, 0]]  # the generated frames blue
    assert not bench.score_i2v("a red circle moving up", red)["color"]
    noise = np.random.default_rng(0).integers(0, 256, size=clip.shape, dtype=np.uint8)
    noisy = np.concatenate([clip[:1], noise[1:]])  # an untrained model: noise after the given frame
    assert not any(bench.score_i2v(prompt, noisy)[k] for k in ("start", "direction", "axis"))
    frozen = np.concatenate([clip[:2], np.repeat(clip[1:2], len(clip) - 2, axis=0)])  # stops after the given frames
    assert not bench.score_continuation(prompt, frozen)["direction"]
    assert bench.score_continuation(prompt, frozen)["start"]
    squares = clips["a blue square moving left"]
    assert not bench.score_i2v("a blue triangle moving left", squares)["shape"]


def test_rates_split_seen_and_held_out():
    scored = [(p, {"color": True, "shape": not bench.learning.is_held_out(p), "start": True}) for p in bench.prompts()]
    scored = [(p, s | {"direction": True, "axis": True}) for p, s in scored]
    ratios = bench.rates(scored, "i2v")
    assert ratios["i2v.shape"] == 1.0 and ratios["i2v.held_out.shape"] == 0.0 and ratios["i2v.start"] == 1.0
