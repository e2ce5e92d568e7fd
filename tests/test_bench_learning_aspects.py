"""The mixed-aspect learning benchmark's data and scoring, on ground truth (no training): toy images at 1:1, 2:1
and 1:2 cut to their buckets as prep cuts them, and clips of both lengths, score perfectly at every aspect; the
comparison with a square run's result."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.buckets import assign
from pipelines.data.image import cover_crop
from pipelines.data.media import decode_clip
from pipelines.evaluate.probe import SIDES
from pipelines.sample.outputs import output_stem, write_sample, write_sidecar
from pipelines.toy.data import ToyDataConfig, make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


aspects = _load("bench_learning_aspects")
base = aspects.base


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    cfg = ToyDataConfig(
        images_per_combo=3,
        videos_per_combo=len(aspects.DATA.video_durations),
        shapes=base.SHAPES,
        places=SIDES,
        image_sizes=aspects.DATA.image_sizes,
        video_durations=aspects.DATA.video_durations,
    )
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), cfg)


def _write(folder: Path, samples: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for index, (prompt, frames) in enumerate(samples.items()):
        stem = output_stem(index, prompt)
        files = write_sample(folder, stem, frames, fps=4.0)
        settings = {"frames": 1 if frames.ndim == 3 else len(frames)}
        write_sidecar(
            folder / f"{stem}.json",
            {"prompt": prompt, "index": index, "files": [f.name for f in files]} | {"settings": settings},
        )


def test_every_aspect_and_length_of_the_ground_truth_scores_perfectly(tmp_path, toy):
    buckets = tuple(aspects.ASPECTS.values())
    by_aspect: dict[str, dict[str, np.ndarray]] = {a: {} for a in aspects.ASPECTS}
    for path in sorted(toy["images"].glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        cut = assign(pixels.shape[1], pixels.shape[0], buckets)  # as prep-images --buckets cuts it
        image, _ = cover_crop(pixels, cut)
        aspect = next(a for a, size in aspects.ASPECTS.items() if size == cut.bucket)
        by_aspect[aspect][path.with_suffix(".txt").read_text()] = image
    assert all(len(samples) == 48 for samples in by_aspect.values())  # 12 colour-shape pairs x 4 sides, each aspect
    scores = {}
    for aspect, samples in by_aspect.items():
        _write(tmp_path / aspect, samples)
        read = base.read_samples(tmp_path / aspect)
        scores[f"t2i.{aspect}"] = base.tally([(p, base.probe(p, x)) for p, x in read])
    decoded = {path: decode_clip(path.read_bytes()) for path in sorted(toy["videos"].glob("*.mp4"))}
    for frames in aspects.LENGTHS:
        clips = {}
        for path, video in decoded.items():
            # each video is one clip, of the longest length that fits it, as prep-videos cuts it
            fits = max(n for n in aspects.LENGTHS if (n - 1) * base.FRAME_STRIDE < len(video))
            if fits != frames:
                continue
            clip = video[: frames * base.FRAME_STRIDE : base.FRAME_STRIDE]
            clips[path.with_suffix(".txt").read_text()] = np.stack(
                [np.asarray(Image.fromarray(f).resize((32, 32), Image.BILINEAR)) for f in clip]
            )
        assert len(clips) == 48  # 12 colour-shape pairs x 4 directions, each length
        _write(tmp_path / f"{frames}f", clips)
        read = base.read_samples(tmp_path / f"{frames}f")
        scores[f"t2v.{frames}f"] = base.tally([(p, base.probe(p, x)) for p, x in read])
    ratios = aspects.ratios_of("gt", scores)
    assert len(ratios) == 2 * (3 * 3 + 2 * 4)  # seen and held-out pairs' prompts, each attribute, aspect and length
    assert ratios == {key: 1.0 for key in ratios}, {k: v for k, v in ratios.items() if v != 1.0}
    assert {"gt.t2i.2:1.place", "gt.t2i.1:2.shape", "gt.t2v.4f.direction"} <= set(ratios)


def test_each_attribute_is_compared_with_the_square_run():
    ratios = {"flow.t2i.2:1.shape": 0.80, "flow.t2i.2:1.held_out.shape": 0.1, "flow.t2v.4f.direction": 0.95}
    square = {"ratios": {"flow.t2i.shape": 0.90, "flow.t2v.direction": 0.96, "flow.t2i.held_out.shape": 0.9}}
    differences, goals = aspects.against_square(ratios, square)
    assert differences == {"flow.t2i.2:1.shape.minus_square": -0.1, "flow.t2v.4f.direction.minus_square": -0.01}
    assert goals == {key: ">= -0.05" for key in differences}  # held-out pairs are not compared


def test_a_square_result_at_other_t2i_steps_is_refused(capsys):
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit) as exit_info:
        aspects.check_square_steps(parser, {"figures": {"t2i_steps": 2000, "t2v_steps": 250}}, 2600)
    assert exit_info.value.code == 2
    assert "--square-result was trained with 2000 T2I steps and this run takes 2600" in capsys.readouterr().err
    aspects.check_square_steps(parser, {"figures": {"t2i_steps": 2600}}, 2600)  # the same training: accepted
    aspects.check_square_steps(parser, {"figures": {}}, 2600)  # from before the steps were recorded: announced
    assert "records no T2I steps: compare only a square run of 2600 T2I steps" in capsys.readouterr().err


def test_training_minutes_are_read_per_seed_or_from_a_one_seed_result():
    per_seed = {"data_minutes": 3.0, "flow.seed0.t2v_minutes": 4.0, "flow.seed1.t2v_minutes": 6.0, "total_minutes": 30}
    assert aspects.stage_minutes(per_seed, "t2v") == 5.0  # the mean over the seeds
    assert aspects.stage_minutes({"flow.t2v_minutes": 18.12, "flow.t2i_minutes": 76.39}, "t2i") == 76.39
    assert aspects.stage_minutes(per_seed, "t2i") is None


def test_rescoring_keeps_the_runs_trained_before_and_trains_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "train_stage", lambda *a, **k: calls.append(a) or 1.0)
    args = argparse.Namespace(
        rescore=True,
        t2i_from=None,
        smoke=True,
        bucket_batch="fixed",
        t2v_extra="",
        t2i_steps=3,
        t2v_steps=3,
        vae="pixel",
        model_overrides='{"position_encoding": "sincos+rope"}',
    )
    runs = tmp_path / "runs" / "flow-seed4"
    with pytest.raises(SystemExit, match="no trained model"):
        aspects.train("flow", {}, tmp_path, args, seed=4)
    for stage in ("t2i", "t2v"):
        (runs / stage / "model").mkdir(parents=True)
    minutes, found = aspects.train("flow", {}, tmp_path, args, seed=4)
    assert (minutes, found, calls) == ({}, {"t2i": runs / "t2i", "t2v": runs / "t2v"}, [])
    assert all((runs / stage / "model").is_dir() for stage in ("t2i", "t2v"))
    args.rescore = False  # without it, the seed's runs start afresh: both stages trained
    minutes, _ = aspects.train("flow", {}, tmp_path, args, seed=4)
    assert [c[0] for c in calls] == ["t2i", "t2v"] and minutes == {"t2i": 1.0, "t2v": 1.0}
    for stage, _, _, _, shared, *_ in calls:  # --model-overrides reach both stages' model
        model = json.loads(shared[shared.index("--model") + 1])
        assert model["position_encoding"] == "sincos+rope" and model["depth"] == 2, stage
    assert not runs.exists()


@pytest.mark.parametrize("script", [aspects, base])
@pytest.mark.parametrize("overrides", ['{"depth": 4', '["depth", 4]'])
def test_model_overrides_that_are_not_a_json_object_are_refused(script, overrides, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script.__file__, "--smoke", "--model-overrides", overrides])
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before any work
        script.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model-overrides" in err and "give an object such as" in err
    assert base.json_object('{"position_encoding": "rope"}') == '{"position_encoding": "rope"}'


def test_the_benchmark_model_has_relative_positions_unless_overridden():
    assert json.loads(aspects.model_overrides("")) == {"position_encoding": "sincos+rope"}
    assert json.loads(aspects.model_overrides('{"depth": 4}')) == {"position_encoding": "sincos+rope", "depth": 4}
    assert json.loads(aspects.model_overrides('{"position_encoding": "sincos"}')) == {"position_encoding": "sincos"}
