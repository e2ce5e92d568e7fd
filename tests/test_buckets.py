"""Buckets in prep and encode: parsing, nearest-aspect assignment and crop boxes (against independent
computations), prep-images / prep-videos / encode-latents cutting each sample to its bucket and recording it,
several clip lengths, and the sizes a VAE or a patch size cannot take refused."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from videos import read_counter, write_video

from pipelines.data import schema
from pipelines.data.buckets import assign, fit, nearest, parse_buckets
from pipelines.data.media import decode_clip, decode_image
from pipelines.data.shards import iter_shard, list_shards
from pipelines.data.video import ClipPlan, VideoInfo, plan_clips
from pipelines.errors import GentronError

# ------------------------------------------------------------------------------------------ pure functions


def test_named_set_holds_the_common_ratios_at_the_budget_in_patchable_sides():
    for side in (256, 512, 1024):
        sizes = parse_buckets("aspect").sizes(side)
        for w, h in sizes:
            assert w % 16 == 0 and h % 16 == 0
            assert 0.85 < w * h / side**2 < 1.15  # the pixel budget, within rounding
        ratios = [w / h for w, h in sizes]
        for want in (1, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2, 1 / 2):
            assert min(abs(math.log(r / want)) for r in ratios) < 0.05, (side, want)
    assert parse_buckets("aspect:32").sizes(512)[0][0] % 32 == 0
    assert parse_buckets("square").sizes(48) == ((48, 48),)
    assert parse_buckets(" 64x32, 32x64 ").sizes(0) == ((32, 64), (64, 32))  # explicit: no budget, by aspect


@pytest.mark.parametrize(
    "text, message",
    [("wide", "is not a bucket"), ("64x33", "odd"), ("64x32,64x32", "twice"), ("aspect:7", "even"), ("0x8", "odd")],
)
def test_bad_bucket_lists_are_refused_with_the_accepted_forms(text, message):
    with pytest.raises(GentronError, match=message) as err:
        parse_buckets(text)
    assert "square" in err.value.hint or "even" in err.value.hint or "once" in err.value.hint


def test_assignment_and_crop_box_against_an_independent_computation():
    sizes = parse_buckets("aspect").sizes(256)
    ratios = sorted(w / h for w, h in sizes)
    # independent: the bucket boundaries are the geometric means of neighbouring ratios
    bounds = [math.sqrt(a * b) for a, b in zip(ratios, ratios[1:])]
    rng = np.random.default_rng(0)
    for _ in range(400):
        width, height = (int(v) for v in rng.integers(20, 3000, 2))
        cut = assign(width, height, sizes)
        bw, bh = cut.bucket
        expected_ratio = ratios[int(np.searchsorted(bounds, width / height))]
        assert bw / bh == pytest.approx(expected_ratio)
        rw, rh = cut.resized
        # the smallest cover: one side exactly the bucket's, the other at least, the aspect kept to rounding
        assert (rw == bw and rh >= bh) or (rh == bh and rw >= bw)
        assert abs(rw / rh - width / height) <= 1 / min(rw, rh) * max(1, width / height) + 1e-9
        left, top, right, bottom = cut.crop_box
        assert (right - left, bottom - top) == (bw, bh)
        assert left == (rw - bw) // 2 and top == (rh - bh) // 2  # centered, by the minimum
        assert cut.upscaled == (max(bw / width, bh / height) > 1)
    assert nearest(100, 100, ((64, 32), (32, 64))) == (64, 32)  # a tie keeps the first listed


def test_square_fit_is_the_paper_short_side_resize_and_center_crop():
    assert fit(300, 200, (100, 100)) == fit(300, 200, (100, 100))
    cut = fit(300, 200, (100, 100))
    assert cut.resized == (150, 100) and cut.crop_box == (25, 0, 125, 100) and not cut.upscaled
    assert fit(50, 80, (100, 100)).upscaled


def test_several_clip_lengths_take_the_longest_that_fits_each_position():
    times = [k / 24 for k in range(24 * 5)]  # 5 s at 24 fps, on the timeline itself
    info = VideoInfo(320, 240, 24.0, Fraction(1, 24), np.arange(len(times), dtype=np.int64), len(times))
    clips = plan_clips(info, ClipPlan(frames=(1, 9, 17), frame_stride=3))
    lengths = [len(c.frame_indices) for c in clips]
    # 120 timeline frames: 17 frames span 49 -> clips at 0 and 51 (stride 51); 102 + 9 frames (span 25) > 120,
    # so 102 takes 1 frame, then 105, 108, ... one each
    starts = [round(c.timeline_times[0] * 24) for c in clips]
    assert lengths[:2] == [17, 17] and starts[:3] == [0, 51, 102]
    assert lengths[2:] == [1] * (len(clips) - 2) and starts[-1] == 117
    for clip in clips:  # frame times exact on the timeline
        steps = np.diff(clip.timeline_times * 24)
        assert np.allclose(steps, 3)
    one = plan_clips(info, ClipPlan(frames=8, frame_stride=6))
    assert [len(c.frame_indices) for c in one] == [8, 8]  # a single length: as before


# ------------------------------------------------------------------------------------------ prep-images


def _gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(np.uint8)


def _shard_samples(folder):
    out = {}
    for shard in list_shards(folder):
        for key, fields in iter_shard(shard):
            out[key] = fields
    return out


def test_prep_images_cuts_each_image_to_its_nearest_bucket_and_records_it(tmp_path):
    from pipelines.prep.images import PrepImagesConfig, prep_images

    src = tmp_path / "in"
    src.mkdir()
    shapes = {"wide": (90, 44), "tall": (40, 84), "even": (50, 46), "tiny": (20, 10)}
    for name, (w, h) in shapes.items():
        Image.fromarray(_gradient(w, h)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(name)
    result = prep_images(
        PrepImagesConfig(src, tmp_path / "out", size=32, format="png", min_size=0, buckets="32x16,16x32,24x24")
    )
    assert result.samples_out == 4
    samples = _shard_samples(tmp_path / "out")
    expected_bucket = {"wide": (32, 16), "tall": (16, 32), "even": (24, 24), "tiny": (32, 16)}
    for name, (w, h) in shapes.items():
        fields = samples[name]
        meta = schema.decode_json(fields[schema.META])["prep"]
        pixels = decode_image(fields["png"])
        bw, bh = expected_bucket[name]
        assert meta["bucket"] == [bw, bh] and meta["source_size"] == [w, h] and pixels.shape == (bh, bw, 3)
        # independent: PIL resize to the recorded size, then the recorded box
        rw, rh = meta["resized_size"]
        assert min(rw / bw, rh / bh) == 1 and abs(rw / rh - w / h) < 0.1
        reference = np.asarray(Image.fromarray(_gradient(w, h)).resize((rw, rh), Image.Resampling.BICUBIC))
        left, top, right, bottom = meta["crop_box"]
        assert (right - left, bottom - top) == (bw, bh)
        np.testing.assert_array_equal(pixels, reference[top:bottom, left:right])
        assert meta["upscaled"] == (name == "tiny")
    counters = json.loads((tmp_path / "out" / "_summary.json").read_text())["counters"]
    assert counters["upscaled_images"] == 1
    assert (counters["bucket_32x16"], counters["bucket_16x32"], counters["bucket_24x24"]) == (2, 1, 1)


def test_prep_images_refuses_no_crop_with_buckets_and_a_resume_with_other_buckets(tmp_path):
    from pipelines.prep.images import OPTIONS_FILE, PrepImagesConfig, prep_images

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_gradient(40, 30)).save(src / "a.png")
    (src / "a.txt").write_text("a")
    with pytest.raises(GentronError, match="--no-crop"):
        prep_images(PrepImagesConfig(src, tmp_path / "x", size=32, crop=False, buckets="aspect"))
    with pytest.raises(GentronError, match="smaller than one 16-pixel step"):
        prep_images(PrepImagesConfig(src, tmp_path / "x", size=8, buckets="aspect"))
    prep_images(PrepImagesConfig(src, tmp_path / "sq", size=16))
    assert json.loads((tmp_path / "sq" / OPTIONS_FILE).read_text())["buckets"] == "square"
    assert prep_images(PrepImagesConfig(src, tmp_path / "sq", size=16)).skipped == 1
    with pytest.raises(GentronError, match="different options"):
        prep_images(PrepImagesConfig(src, tmp_path / "sq", size=16, buckets="16x16,32x16"))


# ------------------------------------------------------------------------------------------ prep-videos


def test_prep_videos_buckets_and_clip_lengths(tmp_path):
    from pipelines.prep.videos import PrepVideosConfig, prep_videos

    src = tmp_path / "in"
    src.mkdir()
    sources = {"wide": (192, 96), "tall": (96, 192), "mid": (150, 96), "small": (40, 20)}
    for name, size in sources.items():
        write_video(src / f"{name}.mp4", n_frames=60, fps=24, size=size)  # 2.5 s
        (src / f"{name}.txt").write_text(name)
    # at 64 x 64 pixels the named set has 96x48, 80x48, 64x48, 64x64, 48x64, 48x80, 48x96
    expected = {"wide": (96, 48), "tall": (48, 96), "mid": (80, 48)}  # 150:96 = 1.56: nearest 5:3 (log scale)
    config = PrepVideosConfig(src, tmp_path / "out", short_side=64, frames=[2, 4], frame_stride=6, buckets="aspect")
    result = prep_videos(config)
    stats = json.loads((tmp_path / "out" / "000000.stats.json").read_text())
    assert {f["key"]: f["reason"] for f in stats["failures"]} == {"small": "too_small"}  # 40x20 < its 96x48
    by_video: dict[str, list] = {}
    for key, fields in sorted(_shard_samples(tmp_path / "out").items()):
        meta = schema.decode_json(fields[schema.META])["prep"]
        by_video.setdefault(key.rsplit("_", 1)[0], []).append((meta, decode_clip(fields[schema.VIDEO])))
    assert by_video.keys() == expected.keys()
    for name, bucket in expected.items():
        clips = by_video[name]
        # 60 timeline frames: 4 frames span 19 -> clips at 0 and 24; at 48, 48 + 19 > 60 but 2 frames (span 7) fit
        assert [len(m["source_frame_indices"]) for m, _ in clips] == [4, 4, 2]
        assert [m["timeline_times"][0] for m, _ in clips] == [0.0, 1.0, 2.0]
        for meta, frames in clips:
            assert meta["bucket"] == list(bucket) and frames.shape[1:3] == (bucket[1], bucket[0])
            assert meta["source_size"] == list(sources[name])
            cut = fit(*sources[name], bucket)  # the recorded cut is the one computed from the source size
            assert meta["crop_box"] == list(cut.crop_box) and meta["resized_size"] == list(cut.resized)
            assert [read_counter(f) for f in frames] == meta["source_frame_indices"]  # frame times exact
            assert np.allclose(np.diff(meta["timeline_times"]), 6 / 24)
    assert by_video["mid"][0][0]["crop_box"] == [0, 1, 80, 49]  # 150x96 -> 80x51, one row cut at the top
    assert result.summary["counters"]["clips_of_4_frames"] == 6
    upscaled = prep_videos(
        PrepVideosConfig(src, tmp_path / "up", short_side=64, frames=4, frame_stride=6, buckets="aspect", upscale=True)
    )
    assert upscaled.failed == 0 and upscaled.summary["counters"]["upscaled_videos"] == 1


# ------------------------------------------------------------------------------------------ encode-latents


def test_encode_latents_cuts_each_sample_to_its_bucket_one_size_per_vae_call(tmp_path):
    from pipelines.data.shards import ShardWriter
    from pipelines.encode.latents import EncodeLatentsConfig, encode_latents
    from pipelines.model.vae import PixelVAE

    src = tmp_path / "in"
    src.mkdir()
    shapes = [(40, 20), (44, 20), (20, 40), (30, 30), (16, 30)]
    with ShardWriter(src / "000000.tar") as writer:
        for k, (w, h) in enumerate(shapes):
            writer.write(
                f"s{k}",
                {"png": _png(_gradient(w, h)), schema.CAPTION: b"x", schema.META: schema.encode_json({"prep": {}})},
            )

    class CountingVAE(PixelVAE):
        calls: list = []

        def _encode_call(self, clips):  # (B, 1, H, W, 3): an image VAE sees frames alone
            self.calls.append(tuple(clips.shape))
            return super()._encode_call(clips)

    vae = CountingVAE()
    result = encode_latents(
        EncodeLatentsConfig(
            src, tmp_path / "out", vae="pixel", resolution=24, buckets="32x16,16x32,24x24", batch_size=8
        ),
        vae=vae,
    )
    assert result.samples_out == 5 and result.failed == 0
    # one size per VAE call: neighbours of one size share a call, a new size starts the next, order kept
    assert vae.calls == [(2, 1, 16, 32, 3), (1, 1, 32, 16, 3), (1, 1, 24, 24, 3), (1, 1, 32, 16, 3)]
    out = _shard_samples(tmp_path / "out")
    assert list(out) == [f"s{k}" for k in range(5)]
    expected = {"s0": (32, 16), "s1": (32, 16), "s2": (16, 32), "s3": (24, 24), "s4": (16, 32)}
    for key, (bw, bh) in expected.items():
        latent = schema.decode_npy(out[key][schema.LATENT_MEAN])
        meta = schema.decode_json(out[key][schema.META])["latent"]
        assert latent.shape == (3, bh, bw) and meta["crop"]["bucket"] == [bw, bh] and meta["buckets"]
        assert meta["shape"] == [3, bh, bw]
    assert result.summary["counters"]["upscaled_samples"] == 1  # 16x30 -> covers 16x32 only enlarged

    class EightX(PixelVAE):
        downsample = 8

    with pytest.raises(GentronError, match="multiple of the VAE"):
        encode_latents(
            EncodeLatentsConfig(src, tmp_path / "bad", vae="pixel", resolution=24, buckets="20x12"), vae=EightX()
        )


def _png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="png")
    return buf.getvalue()


def test_encode_latents_says_when_it_cuts_bucketed_samples_to_its_square(tmp_path):
    from pipelines.encode.latents import EncodeLatentsConfig, encode_latents
    from pipelines.prep.images import PrepImagesConfig, prep_images
    from pipelines.progress import NullReporter

    class Log(NullReporter):
        lines: list = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    src = tmp_path / "in"
    src.mkdir()
    for name, (w, h) in {"wide": (64, 32), "even": (32, 32)}.items():
        Image.fromarray(_gradient(w, h)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(name)
    prep_images(PrepImagesConfig(src, tmp_path / "prep", size=32, format="png", buckets="32x16,32x32"))
    log = Log()
    result = encode_latents(EncodeLatentsConfig(tmp_path / "prep", tmp_path / "sq", vae="pixel", resolution=16), log)
    assert result.summary["counters"]["bucketed_samples_cut_square"] == 2
    assert any("prepared in aspect-ratio buckets" in line and "--buckets" in line for line in log.lines)
    kept = encode_latents(
        EncodeLatentsConfig(tmp_path / "prep", tmp_path / "b", vae="pixel", resolution=32, buckets="32x16,32x32")
    )
    assert "bucketed_samples_cut_square" not in kept.summary["counters"]
    out = _shard_samples(tmp_path / "b")
    assert schema.decode_npy(out["wide"][schema.LATENT_MEAN]).shape == (3, 16, 32)  # the prep cut, kept as is
    prep_meta = schema.decode_json(out["wide"][schema.META])["prep"]
    latent_meta = schema.decode_json(out["wide"][schema.META])["latent"]
    assert prep_meta["bucket"] == latent_meta["crop"]["bucket"] == [32, 16]
    assert latent_meta["crop"]["resized_size"] == latent_meta["crop"]["source_size"] == [16, 32]  # no resampling
