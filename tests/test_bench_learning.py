"""The learning benchmark's scoring, on ground-truth "samples" written the way `gentron sample` writes them (no
training)."""

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.media import decode_clip
from pipelines.evaluate.probe import RELATIONS, SIDES, parse_caption, parse_pair_caption
from pipelines.sample.outputs import output_stem, write_sample, write_sidecar
from pipelines.toy.data import ToyDataConfig, draw_pair, make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_learning"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _write_samples(folder: Path, prompts: list[str], pixels: dict[str, np.ndarray]) -> None:
    """One sample per prompt, as `gentron sample` writes it: media files and a JSON sidecar naming them."""
    folder.mkdir(parents=True)
    for index, prompt in enumerate(prompts):
        stem = output_stem(index, prompt)
        frames = pixels[prompt]
        files = write_sample(folder, stem, frames, fps=4.0)
        settings = {"frames": 1 if frames.ndim == 3 else len(frames)}
        write_sidecar(
            folder / f"{stem}.json",
            {"prompt": prompt, "index": index, "files": [f.name for f in files], "settings": settings},
        )


def _resize(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((32, 32), Image.BILINEAR))


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    """Each benchmark prompt's ground truth at the training size: one toy image / 8-frame clip per prompt."""
    cfg = ToyDataConfig(images_per_combo=1, videos_per_combo=1, shapes=bench.SHAPES, places=SIDES)  # nothing held out
    dirs = make_toy_dataset(tmp_path_factory.mktemp("toy"), cfg)
    images = {
        p.with_suffix(".txt").read_text(): _resize(np.asarray(Image.open(p))) for p in dirs["images"].glob("*.png")
    }
    videos = {}
    for path in dirs["videos"].glob("*.mp4"):
        clip = decode_clip(path.read_bytes())[
            : bench.FRAMES * bench.FRAME_STRIDE : bench.FRAME_STRIDE
        ]  # as prep-videos picks
        videos[path.with_suffix(".txt").read_text()] = np.stack([_resize(f) for f in clip])
    return images, videos


def test_prompts_cover_every_combination_with_the_held_out_pairs():
    for prompts in (bench.image_prompts(), bench.video_prompts()):
        assert len(prompts) == len(set(prompts)) == 48
        assert sum(bench.is_held_out(p) for p in prompts) == 8  # 2 pairs x 4 places or directions
    assert bench.is_held_out("a red triangle on the left") and not bench.is_held_out("a red circle on the left")
    assert bench.DATA.held_out == bench.HELD_OUT
    assert len(bench.DATA.combos()) * len(bench.DATA.places) * bench.DATA.images_per_combo == 2000
    assert len(bench.DATA.combos()) * 4 * bench.DATA.videos_per_combo == 400


def test_ground_truth_scores_perfectly(tmp_path, ground_truth):
    images, videos = ground_truth
    assert set(images) == set(bench.image_prompts()) and set(videos) == set(bench.video_prompts())
    for stage, prompts, pixels, attributes in (
        ("t2i", bench.image_prompts(), images, bench.IMAGE_ATTRIBUTES),
        ("t2v", bench.video_prompts(), videos, bench.VIDEO_ATTRIBUTES),
    ):
        _write_samples(tmp_path / stage, prompts, pixels)
        read = bench.read_samples(tmp_path / stage)
        assert [prompt for prompt, _ in read] == prompts  # sidecars sort by index
        assert all(
            np.array_equal(frames, pixels[prompt]) for prompt, frames in read
        )  # exact pixels, from the film strip
        groups = bench.tally([(prompt, bench.probe(prompt, frames)) for prompt, frames in read])
        assert (groups["seen"].total, groups["held_out"].total) == (40, 8)
        ratios = bench.ratios_of("gt", stage, groups, attributes)
        assert ratios == {f"gt.{stage}.{group}{a}": 1.0 for group in ("", "held_out.") for a in attributes}


def test_aggregation_splits_seen_and_held_out_and_counts_each_attribute(tmp_path, ground_truth):
    images, videos = ground_truth
    # Images: every held-out prompt gets the same colour and place drawn as a square (its shape is wrong)
    wrong_images = dict(images)
    for prompt in bench.image_prompts():
        if bench.is_held_out(prompt):
            asked = parse_caption(prompt)
            wrong_images[prompt] = images[bench.image_caption(asked["color"], asked["place"], "square")]
    # Videos: seen prompts moving left play backwards (wrong direction, right axis); held-out ones are right
    wrong_videos = {
        p: v[::-1] if p.endswith("moving left") and not bench.is_held_out(p) else v for p, v in videos.items()
    }
    _write_samples(tmp_path / "t2i", bench.image_prompts(), wrong_images)
    _write_samples(tmp_path / "t2v", bench.video_prompts(), wrong_videos)

    def score(stage):
        return bench.tally([(p, bench.probe(p, f)) for p, f in bench.read_samples(tmp_path / stage)])

    images_score, videos_score = score("t2i"), score("t2v")
    assert dict(images_score["seen"].hits) == {"color": 40, "shape": 40, "place": 40}
    assert dict(images_score["held_out"].hits) == {"color": 8, "shape": 0, "place": 8}
    assert dict(videos_score["seen"].hits) == {
        "color": 40,
        "shape": 40,
        "direction": 30,
        "axis": 40,
    }  # 10 seen pairs move left
    assert dict(videos_score["held_out"].hits) == {"color": 8, "shape": 8, "direction": 8, "axis": 8}

    ratios = bench.ratios_of("flow", "t2i", images_score, bench.IMAGE_ATTRIBUTES) | bench.ratios_of(
        "flow", "t2v", videos_score, bench.VIDEO_ATTRIBUTES
    )
    assert ratios["flow.t2i.shape"] == 1.0 and ratios["flow.t2i.held_out.shape"] == 0.0
    assert (
        ratios["flow.t2v.direction"] == 0.75
        and ratios["flow.t2v.axis"] == 1.0
        and ratios["flow.t2v.held_out.direction"] == 1.0
    )

    result = bench.summary(ratios | {"ddpm.t2i.shape": 0.1}, {"flow.t2i_minutes": 1.5}, candidate="flow", threads=2)
    assert (
        result["benchmark"] == "learning" and result["threads"] == 2 and result["figures"] == {"flow.t2i_minutes": 1.5}
    )
    assert set(result["goals"]) == set(result["met"]) and all(
        k.startswith("flow.") for k in result["goals"]
    )  # the candidate's only
    assert result["goals"]["flow.t2i.color"] == ">= 0.95" and result["goals"]["flow.t2v.held_out.axis"] == ">= 0.70"
    failed = {k for k, ok in result["met"].items() if not ok}
    assert failed == {"flow.t2i.held_out.shape", "flow.t2v.direction"}


def test_a_group_without_prompts_is_left_out_and_missing_goals_are_not_met():
    groups = bench.tally([("a green square on the left", {"color": True, "shape": False, "place": True})])
    assert groups["held_out"].total == 0 and groups["held_out"].rate("color") == 0.0
    assert bench.ratios_of("ddpm", "t2i", groups, bench.IMAGE_ATTRIBUTES) == {
        "ddpm.t2i.color": 1.0,
        "ddpm.t2i.shape": 0.0,
        "ddpm.t2i.place": 1.0,
    }
    result = bench.summary({"ddpm.t2i.color": 1.0}, {}, candidate="ddpm", threads=1)
    assert result["met"]["ddpm.t2i.color"] is True and result["met"]["ddpm.t2v.direction"] is False


def test_the_diagnosis_regeneration_ends_at_x0_with_an_oracle_velocity_and_follows_the_guidance():
    """learning_diagnosis.regenerate: with the exact velocity of a known x0 (v = (x_t - x0) / t on the straight path)
    the Euler ODE from any t0 lands on x0; guidance scales the conditional minus unconditional velocity."""
    import torch

    spec = importlib.util.spec_from_file_location("learning_diagnosis", ROOT / "benchmarks" / "learning_diagnosis.py")
    diagnosis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnosis)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)

    def oracle(target):
        return lambda x, timestep, text: (x - target) / (timestep / 1000).reshape(-1, 1, 1, 1)

    for t0 in (0.3, 0.9):
        out = diagnosis.regenerate(oracle(x0), x0, noise, "text", "empty", t0, 1000, steps=7, cfg=4.0)
        assert torch.allclose(out, x0, atol=1e-5)
    # the text branch heads for x0, the empty one for zeros: guided by cfg the ODE overshoots to cfg * x0
    other = torch.zeros_like(x0)
    both = lambda x, timestep, text: oracle(x0 if text == "text" else other)(x, timestep, text)  # noqa: E731
    out = diagnosis.regenerate(both, x0, noise, "text", "empty", 0.5, 1000, steps=1, cfg=2.0)
    assert torch.allclose(out, 2.0 * x0, atol=1e-5)


# --------------------------------------------------------------------------- two objects


def _pair_truth(prompts: list[str], swap_held_out: bool = False) -> dict[str, np.ndarray]:
    """Each two-object prompt drawn as the generator draws it, at the training size; with swap_held_out, prompts of a
    held-out pair get the classic failure instead: each colour on the other's shape."""
    rng = np.random.default_rng(0)
    out = {}
    for prompt in prompts:
        want = parse_pair_caption(prompt)
        first, second = want["first"], want["second"]
        if swap_held_out and bench.is_pair_held_out(prompt):
            first, second = (first[0], second[1]), (second[0], first[1])
        out[prompt] = _resize(draw_pair(first, want["relation"], second, bench.PAIR_DATA, rng))
    return out


def test_pair_prompts_cover_every_relation_and_name_each_held_out_pair_both_ways():
    prompts = bench.pair_prompts()
    assert len(prompts) == len(set(prompts)) == 96 and prompts == bench.pair_prompts()  # fixed
    held = [p for p in prompts if bench.is_pair_held_out(p)]
    assert len(held) == 32
    seen_pairs = set(bench.PAIR_DATA.combos())
    for prompt in prompts:
        want = parse_pair_caption(prompt)
        named = {want["first"], want["second"]}
        assert len(named & set(bench.PAIR_HELD_OUT)) == (1 if prompt in held else 0)
        assert len(named & seen_pairs) == (1 if prompt in held else 2)
    for pair in bench.PAIR_HELD_OUT:
        for relation in RELATIONS:
            firsts = [p for p in held if parse_pair_caption(p)["relation"] == relation]
            assert sum(parse_pair_caption(p)["first"] == pair for p in firsts) == 2
            assert sum(parse_pair_caption(p)["second"] == pair for p in firsts) == 2
    relations = Counter(parse_pair_caption(p)["relation"] for p in prompts if p not in held)
    assert relations == {r: 16 for r in RELATIONS}
    assert bench.PAIR_DATA.images == 4000 and set(bench.PAIR_DATA.held_out) == set(bench.PAIR_HELD_OUT)


def test_pair_ground_truth_scores_perfectly_and_a_binding_swap_is_caught(tmp_path):
    prompts = bench.pair_prompts()
    held = [p for p in prompts if bench.is_pair_held_out(p)]
    # held-out prompts whose two asked shapes differ; where they are the same, a swap changes nothing
    differ = sum(parse_pair_caption(p)["first"][1] != parse_pair_caption(p)["second"][1] for p in held)
    assert 16 <= differ < 32
    for name, truth in (("right", _pair_truth(prompts)), ("swapped", _pair_truth(prompts, swap_held_out=True))):
        _write_samples(tmp_path / name, prompts, truth)
        read = bench.read_samples(tmp_path / name)
        assert [p for p, _ in read] == prompts
        groups = bench.tally([(p, bench.probe(p, f)) for p, f in read], is_held=bench.is_pair_held_out)
        assert (groups["seen"].total, groups["held_out"].total) == (64, 32)
        ratios = bench.ratios_of("flow", "pairs", groups, bench.PAIR_COLUMNS)
        assert ratios["flow.pairs.colors"] == ratios["flow.pairs.binding"] == ratios["flow.pairs.all"] == 1.0
        assert ratios["flow.pairs.relation"] == ratios["flow.pairs.held_out.relation"] == 1.0
        assert ratios["flow.pairs.swapped"] == 0.0 and ratios["flow.pairs.held_out.colors"] == 1.0
        swapped = differ if name == "swapped" else 0
        assert dict(groups["held_out"].hits) == {
            "colors": 32,
            "binding": 32 - swapped,
            "relation": 32,
            "all": 32 - swapped,
            "swapped": swapped,
        }
        result = bench.summary(
            ratios, {}, candidate="flow", threads=1, goals=bench.PAIR_GOALS, benchmark="learning-pairs"
        )
        assert result["benchmark"] == "learning-pairs" and set(result["goals"]) == {
            f"flow.{k}" for k in bench.PAIR_GOALS
        }
        assert result["met"]["flow.pairs.held_out.all"] is (name == "right")
        assert result["met"]["flow.pairs.all"] is True


def test_figures_over_seeds_are_the_mean_with_the_lowest_and_highest():
    mean, spread = bench.over_seeds([{"a": 0.5, "b": 1.0}, {"a": 0.75, "b": 1.0, "c": 0.1}, {"a": 1.0, "b": 0.25}])
    assert mean == {"a": 0.75, "b": 0.75} and spread == {"a": [0.5, 1.0], "b": [0.25, 1.0]}  # c: not in every seed
    assert bench._cell([0.5]) == "0.50" and bench._cell([0.5, 1.0]) == "0.75 (0.50-1.00)"
    result = bench.summary(mean, {}, candidate="x", threads=1, spread=spread, seeds=[0, 1, 2])
    assert result["spread"] == spread and result["seeds"] == [0, 1, 2]


def _load_diagnosis():
    spec = importlib.util.spec_from_file_location("learning_diagnosis", ROOT / "benchmarks" / "learning_diagnosis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_diagnosis_reads_the_cross_attention_each_block_computes(tmp_path):
    """cross_attention_probs: probabilities over real tokens only, and the very ones the module's output is made of
    (its output projection of probabilities times values)."""
    import torch
    from einops import rearrange

    from pipelines.model.conditioning import TextCondition
    from pipelines.model.configs import model_config
    from pipelines.model.gentron import GenTronTransformer

    diagnosis = _load_diagnosis()
    torch.manual_seed(0)
    model = GenTronTransformer.from_config(model_config("T/2", in_channels=3, patch_size=4, learn_sigma=False))
    for p in model.parameters():  # away from the zero init, so attention and outputs are not trivial
        torch.nn.init.normal_(p, std=0.2)
    rng = np.random.default_rng(0)
    text = TextCondition.collate(
        [
            {"clip": rng.normal(size=(n, 32)), "clip_pooled": rng.normal(size=32), "t5": rng.normal(size=(n + 2, 32))}
            for n in (3, 5)
        ]
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300.0, 800.0])
    seen = []
    handle = model.blocks[1].cross_attn.register_forward_hook(lambda m, i, o: seen.append((i[1], o)))
    probs = diagnosis.cross_attention_probs(model, x, t, text)
    handle.remove()
    assert len(probs) == len(model.blocks) and probs[0].shape == (2, 4, 16, 5 + 7)
    mask = torch.cat([text.mask("clip"), text.mask("t5")], dim=1)  # the model's token order: clip, then t5
    for p in probs:
        assert torch.allclose(p.sum(dim=-1), torch.ones(2, 4, 16), atol=1e-5)
        assert (p[0][..., ~mask[0]] == 0).all() and (p[0][..., mask[0]] > 0).all()
    module = model.blocks[1].cross_attn
    text_tokens, output = seen[0]
    _, v = rearrange(module.kv(text_tokens), "b l (two h d) -> two b h l d", two=2, h=module.num_heads)
    rebuilt = module.proj(rearrange(probs[1] @ v, "b h n d -> b n (h d)"))
    assert torch.allclose(rebuilt, output, atol=1e-4)


def test_the_diagnosis_finds_each_word_among_the_tokens_of_every_encoder(tmp_path):
    from transformers import AutoTokenizer, ByT5Tokenizer

    from pipelines.model.tiny import build_tiny_clip

    diagnosis = _load_diagnosis()
    clip = AutoTokenizer.from_pretrained(build_tiny_clip(tmp_path / "clip"))
    byt5 = ByT5Tokenizer()
    caption = "a yellow triangle above a red square"
    for word, index in (("yellow", 1), ("red", 5), ("square", 6)):
        start = caption.index(f" {word}") + 1
        ids = clip(caption)["input_ids"]
        found = diagnosis.word_tokens(clip, caption, start, start + len(word))
        assert clip.decode([ids[j] for j in found]).strip() == word
        assert diagnosis.word_tokens(byt5, caption, start, start + len(word)) == list(range(start, start + len(word)))

        class Encoders:
            def get(self, name):
                return type("E", (), {"tokenizer": {"clip": clip, "t5": byt5}[name]})

        lengths = {"clip": 20, "t5": 50}
        both = diagnosis.caption_word_tokens(Encoders(), ["clip", "t5"], lengths, caption, index)
        assert both == found + [20 + j for j in range(start, start + len(word))]


def test_the_benchmark_recipe_is_the_small_data_preset():
    """The learning benchmark's candidate (COMMON, the flow configuration and each stage's flags, last flag wins) sets
    what `gentron train --recipe small-data` sets: the preset the quickstart uses is the one the benchmark measures."""
    from pipelines.train.config import recipe_settings

    for stage in ("t2i", "t2v"):
        words = [*bench.COMMON.split(), *bench.CONFIGS["flow"].split(), *bench.STAGE_FLAGS[stage].split()]
        words.remove("--no-flip")  # the one flag without a value
        flags = dict(zip(words[::2], words[1::2]))  # a later flag overrides an earlier one, as for the CLI
        for key, value in recipe_settings("small-data", stage).items():
            given = flags[f"--{key.replace('_', '-')}"]
            assert given == str(value) if isinstance(value, str) else float(given) == value, (stage, key, given)


def test_data_of_another_clip_layer_is_encoded_with_it_and_kept_apart(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "gentron", lambda args, logfile, threads: calls.append([str(a) for a in args]) or 0.0)
    monkeypatch.setattr(bench, "make_pair_dataset", lambda raw, pairs: Path(raw) / "images")
    last = bench.make_pair_data(tmp_path, bench.SMOKE_PAIR_DATA, 0, 1)
    embeddings = bench.make_pair_data(tmp_path, bench.SMOKE_PAIR_DATA, 0, 1, clip_layer=0)
    assert (last["images"].parent.name, embeddings["images"].parent.name) == ("pair-data", "pair-data-clip-layer0")
    text = [c for c in calls if c[0] == "encode-text"]
    assert [c[c.index("--clip-layer") + 1] for c in text] == ["-1", "0"]
    recipes = [json.loads((d["images"].parent / "done.json").read_text()) for d in (last, embeddings)]
    assert "clip_layer" not in recipes[0] and recipes[1]["clip_layer"] == 0  # data made before the option still fits
    calls.clear()
    assert bench.make_pair_data(tmp_path, bench.SMOKE_PAIR_DATA, 0, 1, clip_layer=0) == embeddings and not calls


def _args(**overrides):
    """The benchmark's parsed options with their defaults (as `main` parses them), some overridden."""
    defaults = dict(
        rescore=False, samples_per_prompt=1, t2i_from=None, model_overrides="", smoke=False, vae="pixel",
        sample_steps=25, cfg=4.0, mfg=1.2, threads=1, extra="", t2i_extra="", t2v_extra="", score_at=[],
    )  # fmt: skip
    return argparse.Namespace(**(defaults | overrides))


def test_rescoring_trains_nothing_and_samples_each_prompt_as_often_as_asked(tmp_path, ground_truth, monkeypatch):
    images, videos = ground_truth
    commands = []

    def fake_gentron(args, logfile, threads):  # `gentron sample` writes each line's ground truth
        args = [str(a) for a in args]
        commands.append(args)
        if args[0] == "sample":
            prompts = Path(args[args.index("--prompts") + 1]).read_text().splitlines()
            truth = images if "t2i" in args[args.index("--model") + 1] else videos
            _write_samples(Path(args[args.index("--out") + 1]), prompts, truth)
        return 0.0

    monkeypatch.setattr(bench, "gentron", fake_gentron)
    runs = tmp_path / "runs" / "one" / "flow" / "seed3"
    args = _args(rescore=True, samples_per_prompt=3)
    with pytest.raises(SystemExit, match="no trained model"):
        bench.run_config("one", "flow", bench.CONFIGS["flow"], {}, tmp_path, args, seed=3)
    for stage in ("t2i", "t2v"):
        (runs / stage / "model").mkdir(parents=True)
    scores, minutes = bench.run_config("one", "flow", bench.CONFIGS["flow"], {}, tmp_path, args, seed=3)
    assert [c[0] for c in commands] == ["sample", "sample"] and minutes == {}  # nothing trained, no minutes
    assert (runs / "t2i" / "model").is_dir()  # the runs it scores are kept
    prompts = (tmp_path / "samples" / "one" / "flow" / "seed3" / "t2i-prompts.txt").read_text().splitlines()
    assert Counter(prompts) == {p: 3 for p in bench.image_prompts()}
    assert len({c[c.index("--seed") + 1] for c in commands}) == 1  # one seed: each line's own is seed + index
    for stage, groups in scores.items():
        assert (groups["seen"].total, groups["held_out"].total) == (3 * 40, 3 * 8), stage
        assert all(groups["seen"].rate(a) == 1.0 for a in groups["seen"].hits), stage
