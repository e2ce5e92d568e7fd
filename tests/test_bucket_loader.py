"""The bucketed training stream: one latent shape per batch, buckets drawn in proportion, every sample of a pool
once per epoch, exact resume and rank split across buckets, token-scaled batches, too-small buckets merged or
dropped and reported, joint T2V buckets (pseudo-videos take the clip buckets' frames)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from train_data import pattern, write_buckets

from pipelines.data import schema
from pipelines.data.loader import StreamSpec, TrainStream, index_source, load_empty_caption, make_loader
from pipelines.model.conditioning import TextCondition

TEXT = (schema.CLIP_POOLED, schema.CLIP_TOKENS, schema.T5_TOKENS)


def make_stream(images, videos, stage="t2i", batch=4, accum=1, start=0, rank=0, world=1, p=0.0, mode="fixed"):
    img = index_source(images, "image") if images else None
    vid = index_source(videos, "video") if videos else None
    empty, _ = load_empty_caption([(img or vid).folder])
    spec = StreamSpec(
        stage=stage,
        seed=11,
        global_batch=batch,
        grad_accum=accum,
        bucket_batch=mode,
        p_motion_free=p,
        text_dropout=0.0,
        buffer_size=3,
        frames=3,
        text_fields=TEXT,
        patch_size=2,
    )
    return TrainStream(
        spec, img, vid, empty, start_step=start, rank=rank, world_size=world, collate_text=TextCondition.collate
    )


def number(key: str) -> int:
    return int(key.split("_")[1])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    # 8x8: 24 samples, 8x16 (wide): 16, 16x8 (tall): 12; as (count, height, width, frames)
    return write_buckets(
        tmp_path_factory.mktemp("mixed") / "img", "image", [(24, 8, 8, 1), (16, 8, 16, 1), (12, 16, 8, 1)]
    )


def test_every_batch_holds_one_shape_and_buckets_are_drawn_in_proportion(mixed):
    stream = make_stream(mixed, None, batch=4)
    shapes = {tuple(b.shape) for b in stream.plan.buckets}
    assert shapes == {(3, 8, 8), (3, 8, 16), (3, 16, 8)}
    steps = 600
    drawn: Counter = Counter()
    keys_by_bucket: dict[tuple, list[int]] = {s: [] for s in shapes}
    for step in range(steps):
        shape = tuple(stream.bucket_of(step).shape)
        drawn[shape] += 1
        for j in range(4):
            source, ref, _ = stream.locate(step, j)
            assert ref.shape == shape  # no batch mixes shapes: every sample is natively of the step's shape
            keys_by_bucket[shape].append(number(ref.key))
    # samples / batch: 24 : 16 : 12 of the steps (binomial, 4 sigma)
    for shape, n in ((((3, 8, 8)), 24), ((3, 8, 16), 16), ((3, 16, 8), 12)):
        p = n / 52
        assert abs(drawn[shape] - steps * p) <= 4 * np.sqrt(steps * p * (1 - p)), (shape, drawn)
    # every pool is an endless sequence of epochs: each block of its size is a permutation of its samples
    for shape, keys in keys_by_bucket.items():
        size = {(3, 8, 8): 24, (3, 8, 16): 16, (3, 16, 8): 12}[shape]
        for e in range(len(keys) // size):
            assert len(set(keys[e * size : (e + 1) * size])) == size, shape
    # the batch's tensors: the drawn latents of those samples
    batch = stream.make_batch(7)
    shape = tuple(stream.bucket_of(7).shape)
    assert tuple(batch["x0"].shape) == (4, *shape) and batch["step_batch"] == 4
    for j in range(4):
        ref = stream.locate(7, j)[1]
        expected = pattern(number(ref.key), side=shape[1], width=shape[2]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(batch["x0"][j].numpy(), expected)


def _steps(stream, count):
    it = iter(make_loader(stream, num_workers=0, pin_memory=False))
    return [next(it) for _ in range(count)]


def test_resume_and_ranks_draw_the_same_buckets_and_samples(mixed):
    whole = _steps(make_stream(mixed, None, batch=4), 12)
    resumed = _steps(make_stream(mixed, None, batch=4, start=7), 5)
    for a, b in zip(whole[7:], resumed):
        for key in ("index", "x0", "noise", "timestep_draw"):
            assert torch.equal(a[key], b[key]), key
    assert len({tuple(b["x0"].shape) for b in whole}) == 3  # the run went through every bucket
    # two ranks, each with two micro-steps per step: concatenated, the same step batches
    ranks = [_steps(make_stream(mixed, None, batch=4, accum=2, rank=r, world=2), 24) for r in (0, 1)]
    for step, batch in enumerate(whole):
        parts = [ranks[r][2 * step + m] for m in (0, 1) for r in (0, 1)]  # micro-step major, then rank
        for key in ("index", "x0", "noise"):
            assert torch.equal(batch[key], torch.cat([p[key] for p in parts])), (step, key)
    # worker processes: the same batches in order
    it = iter(make_loader(make_stream(mixed, None, batch=4), num_workers=2, pin_memory=False))
    parallel = [next(it) for _ in range(6)]
    del it
    assert all(torch.equal(a["x0"], b["x0"]) for a, b in zip(whole, parallel))


def test_token_batches_keep_the_tokens_per_step_of_the_reference_bucket(tmp_path):
    images = write_buckets(tmp_path / "img", "image", [(40, 8, 8, 1), (30, 16, 16, 1), (30, 4, 8, 1)])
    stream = make_stream(images, None, batch=8, mode="tokens", world=2)
    batches = {tuple(b.shape): b.batch for b in stream.plan.buckets}
    # the reference 8x8 (most samples) keeps 8; 16x16 has 4x the tokens: 2; 4x8 half: 16 (multiples of 2 processes)
    assert batches == {(3, 8, 8): 8, (3, 16, 16): 2, (3, 4, 8): 16}
    table = stream.plan.table
    assert table["reference"] == [3, 8, 8]
    assert {tuple(r["shape"]): r["tokens_per_step"] for r in table["buckets"]} == {
        (3, 8, 8): 128,
        (3, 16, 16): 128,
        (3, 4, 8): 128,
    }
    for step in range(12):  # each rank's micro-batch: half the step's bucket batch
        b = stream.make_batch(step)
        assert b["x0"].shape[0] * 2 == batches[tuple(b["x0"].shape[1:])] == b["step_batch"]
    # shares: samples / batch, so every sample is drawn at the same rate
    shares = {tuple(r["shape"]): r["share_of_steps"] for r in table["buckets"]}
    rate = {s: shares[s] * batches[s] / n for s, n in (((3, 8, 8), 40), ((3, 16, 16), 30), ((3, 4, 8), 30))}
    assert max(rate.values()) == pytest.approx(min(rate.values()), rel=1e-4)  # shares are rounded to 6 places


def test_too_small_buckets_are_merged_into_one_that_fits_or_dropped_and_reported(tmp_path):
    # 8x8: 20; 16x8 (tall): 2, fewer than a batch, 8x8 fits inside: merged (center rows); 4x8: 2, nothing fits: dropped
    images = write_buckets(tmp_path / "img", "image", [(20, 8, 8, 1), (2, 16, 8, 1), (2, 4, 8, 1)])
    stream = make_stream(images, None, batch=4)
    table = stream.plan.table
    assert [tuple(b.shape) for b in stream.plan.buckets] == [(3, 8, 8)]
    assert table["merged"] == [
        {
            "shape": [3, 16, 8],
            "images": 2,
            "clips": 0,
            "samples": 2,
            "batch": 4,
            "into": [3, 8, 8],
            "reason": "bucket_too_small",
        }
    ]
    assert [(d["shape"], d["samples"], d["reason"]) for d in table["dropped"]] == [([3, 4, 8], 2, "bucket_too_small")]
    assert table["dropped_by_reason"] == {"bucket_too_small": 2} and table["buckets"][0]["merged_in"] == 2
    seen = set()
    for step in range(12):
        batch = stream.make_batch(step)
        for j in range(4):
            ref = stream.locate(step, j)[1]
            seen.add(number(ref.key))
            if ref.shape == (3, 16, 8):  # merged: its center 8 rows
                full = pattern(number(ref.key), side=16, width=8).astype(np.float16).astype(np.float32)
                np.testing.assert_array_equal(batch["x0"][j].numpy(), full[:, 4:12])
    assert seen == set(range(22))  # the dropped 4x8 samples (22, 23) never come


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    videos = write_buckets(root / "vid", "video", [(8, 8, 8, 4), (8, 8, 16, 2)])
    # images: 8x8 and 8x16 join the clip buckets of their size; 16x16 has none (merged into 8x8: nearest aspect);
    # 4x4 has none and nothing fits inside it (dropped)
    images = write_buckets(
        root / "img", "image", [(12, 8, 8, 1), (6, 8, 16, 1), (5, 16, 16, 1), (3, 4, 4, 1)], first=100
    )
    return images, videos


def test_joint_t2v_pseudo_videos_take_their_clip_buckets_frames(joint):
    images, videos = joint
    stream = make_stream(images, videos, stage="t2v", batch=4, p=0.5)
    assert {tuple(b.shape) for b in stream.plan.buckets} == {(4, 3, 8, 8), (2, 3, 8, 16)}
    table = stream.plan.table
    assert [(m["shape"], m["into"], m["reason"]) for m in table["merged"]] == [
        ([3, 16, 16], [3, 8, 8], "no_clip_bucket")
    ]
    assert [(d["shape"], d["samples"], d["reason"]) for d in table["dropped"]] == [([3, 4, 4], 3, "no_clip_bucket")]
    motion_free = pseudo = total = 0
    for step in range(80):
        batch = stream.make_batch(step)
        frames = batch["x0"].shape[1]
        assert frames == (4 if batch["x0"].shape[-1] == 8 else 2)
        for j in range(4):
            source, ref, flag = stream.locate(step, j)
            total += 1
            motion_free += flag
            if source.kind == "image":
                pseudo += 1
                assert flag and bool(batch["pseudo_video"][j]) and bool(batch["motion_free"][j])
                x = batch["x0"][j]
                assert all(torch.equal(x[0], x[f]) for f in range(frames))  # a still of the bucket's frames
                assert ref.shape[-1] >= batch["x0"].shape[-1] and number(ref.key) < 123  # never a dropped 4x4
            else:
                assert ref.shape == tuple(batch["x0"].shape[1:])
    assert abs(motion_free - total * 0.5) <= 4 * np.sqrt(total * 0.25)
    assert pseudo == motion_free  # both clip sizes have images of their size: every motion-free sample is a still


def test_gentron_buckets_prints_the_table_from_the_shards(joint, tmp_path):
    import json

    from typer.testing import CliRunner

    from gentron_cli.main import app
    from pipelines.data.loader import describe_buckets

    images, videos = joint
    runner = CliRunner()
    result = runner.invoke(app, ["buckets", str(images), str(videos), "--global-batch", "4"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("16x8" in line and "50.0%" in line for line in lines) and any(" 8x8 " in line for line in lines)
    assert "merged: 5 samples of 16x16 into 8x8 (no_clip_bucket" in result.output
    assert "dropped: 3 samples of 4x4 (no_clip_bucket" in result.output
    as_json = runner.invoke(app, ["buckets", str(videos), str(images), "--global-batch", "4", "--json"])
    assert json.loads(as_json.output) == json.loads(json.dumps(describe_buckets([images, videos], global_batch=4)))
    assert json.loads(as_json.output)["buckets"]["stage"] == "t2v"  # clips given: t2v by default
    twice = runner.invoke(app, ["buckets", str(images), str(images)])
    assert twice.exit_code == 2 and "two folders of images" in twice.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = runner.invoke(app, ["buckets", str(empty)])
    assert missing.exit_code == 2 and "no latents" in missing.output
    odd = runner.invoke(app, ["buckets", str(videos), "--global-batch", "5", "--world-size", "2"])
    assert odd.exit_code == 2 and "not divisible" in odd.output


def test_sizes_that_do_not_split_into_patches_are_merged_or_dropped_by_reason(tmp_path):
    from pipelines.data.bucket_plan import plan_buckets

    # 8x8: 8; 9 rows x 8: 6 (enough for a batch, but 9 rows do not split into 2x2 patches: 8x8 fits inside);
    # 6x5: 6 (odd, and nothing fits inside): dropped
    images = index_source(write_buckets(tmp_path / "img", "image", [(8, 8, 8, 1), (6, 9, 8, 1), (6, 6, 5, 1)]), "image")
    plan = plan_buckets("t2i", images, None, global_batch=4, patch_size=2)
    assert [tuple(b.shape) for b in plan.buckets] == [(3, 8, 8)]
    assert [(m["shape"], m["into"], m["reason"]) for m in plan.table["merged"]] == [
        ([3, 9, 8], [3, 8, 8], "not_patchable")
    ]
    assert [(d["shape"], d["reason"]) for d in plan.table["dropped"]] == [([3, 6, 5], "not_patchable")]
    unaware = plan_buckets("t2i", images, None, global_batch=4)  # without the patch size every size is a bucket
    assert len(unaware.buckets) == 3
