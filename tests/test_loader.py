"""The training data stream: motion-free sampling, pseudo-videos, determinism, rank/worker split, resume, bad data."""

from __future__ import annotations

import tarfile
from statistics import NormalDist

import numpy as np
import pytest
import torch
from train_data import pattern, truncate, write_dataset

from pipelines.data import schema
from pipelines.data.loader import StreamSpec, TrainStream, index_source, load_empty_caption, make_loader
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition

TEXT = (schema.CLIP_POOLED, schema.CLIP_TOKENS, schema.T5_TOKENS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return write_dataset(root / "img", "image", samples=12, shards=3), write_dataset(
        root / "vid", "video", samples=10, shards=2
    )


def make_stream(
    images, videos, stage="t2v", p=0.3, micro=4, dropout=0.0, start=0, rank=0, world=1, buffer=5, image_frames=None
):
    """`micro`: samples per rank and step; `start`: the first step."""
    img = index_source(images, "image") if images else None
    vid = index_source(videos, "video") if videos else None
    empty, _ = load_empty_caption([(img or vid).folder])
    spec = StreamSpec(
        stage=stage,
        seed=7,
        global_batch=micro * world,
        p_motion_free=p,
        text_dropout=dropout,
        buffer_size=buffer,
        frames=4,
        text_fields=TEXT,
        **({"image_frames": image_frames} if image_frames else {}),
    )
    return TrainStream(
        spec, img, vid, empty, start_step=start, rank=rank, world_size=world, collate_text=TextCondition.collate
    )


def sample_at(stream, i):
    """Global sample i of a one-bucket stream (step i // batch, position i % batch)."""
    return stream.load_sample(*divmod(i, stream.spec.global_batch))


def locate_at(stream, i):
    return stream.locate(*divmod(i, stream.spec.global_batch))


def binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * np.sqrt(n * p * (1 - p))


def test_motion_free_probability_and_pseudo_videos_repeat_the_image(data):
    images, videos = data
    stream = make_stream(images, videos, p=0.3)
    n, mf, pseudo = 1500, 0, 0
    for i in range(n):
        s = sample_at(stream, i)
        mf += s["motion_free"]
        if s["pseudo_video"]:
            pseudo += 1
            assert s["motion_free"]
            frames = s["latent"]
            assert frames.shape == (4, 3, 8, 8)
            assert all(np.array_equal(frames[0], f) for f in frames[1:])  # exact repeats
            # std is 0 in the test data, so the drawn latent is the stored image exactly
            assert any(np.allclose(frames[0], pattern(k).astype(np.float16).astype(np.float32)) for k in range(12))
        else:
            assert not np.array_equal(s["latent"][0], s["latent"][1])  # a real clip moves
    assert binomial_ok(mf, n, 0.3), mf
    assert pseudo == mf  # with images given, every motion-free sample is an image


def test_video_only_t2v_applies_the_motion_free_mask_to_real_clips(data):
    _, videos = data
    stream = make_stream(None, videos, p=0.6)
    flags = [sample_at(stream, i) for i in range(800)]
    assert binomial_ok(sum(f["motion_free"] for f in flags), 800, 0.6)
    assert not any(f["pseudo_video"] for f in flags)


def test_text_dropout_uses_the_empty_caption_at_its_rate(data):
    images, _ = data
    stream = make_stream(images, None, stage="t2i", dropout=0.25)
    empty = stream.empty_caption["clip_pooled"]
    dropped = sum(np.array_equal(sample_at(stream, i)["text"]["clip_pooled"], empty) for i in range(1000))
    assert binomial_ok(dropped, 1000, 0.25), dropped


def test_timestep_draws_are_uniform_per_sample_and_mapped_by_the_objective(data):
    """The loader draws one uniform number per sample; the objective maps it (logit-normal: toward high noise)."""
    from pipelines.diffusion import ObjectiveConfig, make_objective

    images, videos = data
    stream = make_stream(images, videos, micro=50)
    draws = torch.cat([stream.make_batch(step)["timestep_draw"] for step in range(8)])
    assert draws.dtype == torch.float64 and 0 <= draws.min() and draws.max() < 1
    assert binomial_ok(int((draws >= 0.5).sum()), 400, 0.5)
    uniform, shifted = (
        make_objective(ObjectiveConfig(timestep_sampling=k, timestep_location=0.5, timestep_scale=0.6))
        for k in ("uniform", "logit-normal")
    )
    assert binomial_ok(int((uniform.timesteps(draws) >= 500).sum()), 400, 0.5)
    assert binomial_ok(int((shifted.timesteps(draws) >= 500).sum()), 400, NormalDist().cdf(0.5 / 0.6))
    again = make_stream(images, videos, micro=25).make_batch(4)["timestep_draw"]
    assert torch.equal(again, draws[100:125])  # a function of (seed, sample index) alone


def test_each_epoch_is_a_fresh_permutation_of_all_samples(data):
    images, _ = data
    stream = make_stream(images, None, stage="t2i", micro=12)
    epochs = [[locate_at(stream, e * 12 + k)[1].key for k in range(12)] for e in range(3)]
    for keys in epochs:
        assert sorted(keys) == sorted(f"image_{i}" for i in range(12))
    assert epochs[0] != epochs[1] != epochs[2]


def _batches(stream, count):
    it = iter(make_loader(stream, num_workers=0, pin_memory=False))
    return [next(it) for _ in range(count)]


def test_ranks_split_the_global_batch_and_resume_skips_exactly(data):
    images, videos = data
    whole = _batches(make_stream(images, videos, micro=4), 3)
    rank0 = _batches(make_stream(images, videos, micro=2, rank=0, world=2), 3)
    rank1 = _batches(make_stream(images, videos, micro=2, rank=1, world=2), 3)
    for b, r0, r1 in zip(whole, rank0, rank1):
        for key in ("index", "x0", "noise", "timestep_draw", "motion_free", "text.pooled.clip"):
            assert torch.equal(b[key], torch.cat([r0[key], r1[key]])), key
    resumed = _batches(make_stream(images, videos, micro=4, start=2), 1)[0]
    for key in ("index", "x0", "noise", "timestep_draw", "motion_free"):
        assert torch.equal(resumed[key], whole[2][key]), key


def test_worker_processes_deliver_the_same_batches_in_order(data):
    images, videos = data
    serial = _batches(make_stream(images, videos), 5)
    loader = make_loader(make_stream(images, videos), num_workers=2, pin_memory=False)
    it = iter(loader)
    parallel = [next(it) for _ in range(5)]
    del it
    for a, b in zip(serial, parallel):
        assert (
            torch.equal(a["index"], b["index"])
            and torch.equal(a["x0"], b["x0"])
            and torch.equal(a["noise"], b["noise"])
        )
    assert torch.equal(torch.cat([b["index"] for b in parallel]), torch.arange(20))


def test_bad_samples_are_skipped_and_counted_with_shard_and_key(tmp_path):
    folder = write_dataset(tmp_path / "bad", "image", samples=12, shards=3, bad={1: "wrong_shape", 5: "missing_field"})
    with tarfile.open(folder / "000002.tar") as tar:  # which samples lie wholly before the cut
        members = [(m.name.split(".", 1)[0], m.offset_data + m.size) for m in tar]
    cut = (folder / "000002.tar").stat().st_size // 2
    whole = {k for k, _ in members} - {k for k, end in members if end > cut}
    truncate(folder / "000002.tar", keep_fraction=0.5)
    source = index_source(folder, "image")
    by_key = {f.key: f for f in source.failures}
    assert by_key["image_1"].reason == "wrong_latent_shape" and by_key["image_1"].shard == "000000.tar"
    assert by_key["image_5"].reason == "missing_field"
    assert any(f.reason == "bad_shard" and f.shard == "000002.tar" for f in source.failures)
    kept = {r.key for r in source.refs}
    assert "image_1" not in kept and "image_5" not in kept
    assert {"image_0", "image_2", "image_3", "image_4", "image_6", "image_7", "image_8"} <= kept
    assert {
        k for k in kept if int(k.split("_")[1]) >= 8
    } == whole and whole  # shard 2: exactly the samples before the cut
    damaged = next(f for f in source.failures if f.reason == "bad_shard")
    assert damaged.key == f"image_{8 + len(whole)}"  # the sample the cut went through


def test_missing_or_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(GentronError, match="not found"):
        index_source(tmp_path / "nope", "image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GentronError, match="no shards"):
        index_source(tmp_path / "empty", "image")
    with pytest.raises(GentronError, match="empty_caption.npz"):
        load_empty_caption([tmp_path / "empty"])


def test_a_sample_unreadable_after_indexing_gets_zero_weight_instead_of_a_crash(tmp_path):
    folder = write_dataset(tmp_path / "img", "image", samples=4, shards=1)
    stream = make_stream(folder, None, stage="t2i", micro=4, buffer=1)
    ref = next(r for r in stream.images.refs if r.key == "image_2")
    offset, _ = ref.fields[schema.LATENT_MEAN]
    with open(folder / "000000.tar", "r+b") as f:  # the file changes under the running job
        f.seek(offset)
        f.write(b"garbage!")
    batch = _batches(stream, 1)[0]
    keys = [locate_at(stream, int(i))[1].key for i in batch["index"]]
    expected = torch.tensor([0.0 if k == "image_2" else 1.0 for k in keys])
    assert torch.equal(batch["weight"], expected) and expected.sum() == 3
    assert batch["x0"].shape == (4, 3, 8, 8)


def test_t2i_mixes_images_and_single_frames_of_clips_by_their_counts(data):
    images, videos = data
    stream = make_stream(images, videos, stage="t2i")
    n, from_images = 600, 0
    for i in range(n):
        source, ref, motion_free = locate_at(stream, i)
        latent = sample_at(stream, i)["latent"]
        assert latent.shape == (3, 8, 8) and not motion_free
        k = int(ref.key.split("_")[1])
        if source.kind == "image":
            from_images += 1
            assert np.allclose(latent, pattern(k).astype(np.float16))
        else:  # one of the clip's frames
            assert any(np.allclose(latent, pattern(k, shift=f).astype(np.float16)) for f in range(4))
    assert binomial_ok(from_images, n, 12 / 22), from_images


def test_one_frame_images_fill_whole_steps_in_the_pseudo_video_order(data):
    images, videos = data
    one = _batches(make_stream(images, videos, p=0.3, micro=4, image_frames="one"), 200)
    image_batches, image_latents = 0, []
    for batch in one:
        if batch["motion_free"].all():  # images only, each one latent frame under the motion-free mask
            image_batches += 1
            assert batch["x0"].shape == (4, 1, 3, 8, 8) and batch["pseudo_video"].all()
            image_latents += list(batch["x0"][:, 0])
        else:  # clips only, all moving
            assert batch["x0"].shape == (4, 4, 3, 8, 8) and not batch["motion_free"].any()
            assert not batch["pseudo_video"].any()
    assert binomial_ok(image_batches, 200, 0.3), image_batches
    # the images come in the order the pseudo-video stream reads them (positions are counts of earlier draws)
    pseudo = make_stream(images, videos, p=0.3, micro=4)
    firsts = [s["latent"][0] for s in (sample_at(pseudo, i) for i in range(300)) if s["pseudo_video"]]
    assert len(firsts) > 30 and len(image_latents) > 30
    for got, want in zip(image_latents, firsts):
        assert torch.equal(got, torch.from_numpy(want))
    resumed = _batches(make_stream(images, videos, p=0.3, micro=4, start=3, image_frames="one"), 2)
    for key in ("index", "x0", "noise", "motion_free"):
        assert torch.equal(resumed[0][key], one[3][key]) and torch.equal(resumed[1][key], one[4][key]), key


def test_t2i_takes_the_first_latent_frame_of_clips_encoded_with_a_video_vae(tmp_path, data):
    from train_data import sample_fields, write_empty_caption

    from pipelines.data.shards import ShardWriter, shard_name

    folder = tmp_path / "vid4x"
    folder.mkdir()
    with ShardWriter(folder / f"{shard_name(0)}.tar") as writer:
        for i in range(4):
            fields = sample_fields(i, "video", frames=3)
            meta = schema.decode_json(fields[schema.META])
            meta["latent"] |= {"family": "wan", "temporal_downsample": 4, "frame_step": 4}
            writer.write(schema.make_key("video", i), fields | {schema.META: schema.encode_json(meta)})
    write_empty_caption(folder)
    stream = make_stream(None, folder, stage="t2i")
    for i in range(40):
        _, ref, _ = locate_at(stream, i)
        k = int(ref.key.split("_")[1])
        assert np.allclose(sample_at(stream, i)["latent"], pattern(k).astype(np.float16))  # frame 0 always
    per_frame = make_stream(None, data[1], stage="t2i")  # an image VAE's clips: any frame
    firsts = 0
    for i in range(40):
        _, ref, _ = locate_at(per_frame, i)
        k = int(ref.key.split("_")[1])
        firsts += np.allclose(sample_at(per_frame, i)["latent"], pattern(k).astype(np.float16))
    assert firsts < 30
