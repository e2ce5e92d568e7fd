"""encode-latents and encode-text end to end: values against direct encoder calls, fields carried through,
failures recorded, the empty caption written once, resume after SIGKILL, and the rank split."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from test_shards import tar_with_a_duplicate
from tiny import LogLines
from typer.testing import CliRunner

from gentron_cli.commands import encode as encode_commands
from pipelines.data import media, schema
from pipelines.data.runner import ShardJob
from pipelines.data.shards import ShardWriter, iter_shard, list_shards
from pipelines.encode.latents import CoverCrop, EncodeLatentsConfig, encode_latents
from pipelines.encode.text import EncodeTextConfig, encode_text
from pipelines.model.text_encoders import TextEncoders
from pipelines.model.vae import load_vae

REPO = Path(__file__).resolve().parents[1]


def _frames(t, h, w, seed):
    """Smooth moving gradients: they survive Motion-JPEG well and differ between frames and samples."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 2 * np.pi, size=3)
    frames = [np.stack([127 + 100 * np.sin(x / 5 + y / 7 + i / 2 + base[c]) for c in range(3)], -1) for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def _sample(kind, i, caption=None, h=16, w=24):
    meta = schema.encode_json({"prep": {"source": f"src{i}.mp4", "index": i}})
    fields = {
        schema.META: meta,
        schema.CAPTION: schema.encode_caption(caption if caption is not None else f"a clip number {i}"),
    }
    if kind == "clip":
        fields[schema.VIDEO] = media.encode_clip(_frames(8, h, w, i), fps=4)
    elif kind in ("png", "jpg"):
        fields[kind] = media.encode_image(_frames(1, h, w, i)[0], fmt=kind)
    elif kind == "corrupt":
        fields[schema.VIDEO] = b"not an mp4 at all"
    return fields


def _write_shards(folder, shards):
    """shards: list of lists of (key, fields) -> folder/000000.tar, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, samples in enumerate(shards):
        with ShardWriter(folder / f"{index:06d}.tar") as writer:
            for key, fields in samples:
                writer.write(key, fields)
    return folder


def _read(folder):
    return {path.name: list(iter_shard(path)) for path in list_shards(folder)}


def _assert_input_fields_carried(inp, out, dropped=()):
    """Same shards, same keys in order (less the failures), every input field but json byte-identical."""
    inputs, outputs = _read(inp), _read(out)
    assert list(inputs) == list(outputs)
    for name in inputs:
        expected = [(k, f) for k, f in inputs[name] if k not in dropped]
        assert [k for k, _ in outputs[name]] == [k for k, _ in expected]
        for (_, fin), (_, fout) in zip(expected, outputs[name]):
            for field, data in fin.items():
                if field == schema.META:
                    assert schema.decode_json(fout[field])["prep"] == schema.decode_json(data)["prep"]
                else:
                    assert fout[field] == data, field


# ---------------------------------------------------------------------------------------------
# encode-latents


def test_encode_latents_pixel_round_trip_flip_and_failures(tmp_path):
    inp = _write_shards(
        tmp_path / "in",
        [
            [
                ("c0", _sample("clip", 0)),
                ("bad", _sample("corrupt", 1)),
                ("i2", _sample("png", 2)),
                ("nomedia", _sample("none", 3)),
            ],
            [("i4", _sample("jpg", 4, h=32, w=48)), ("c5", _sample("clip", 5, h=24, w=16))],
        ],
    )
    out = tmp_path / "out"
    res = encode_latents(EncodeLatentsConfig(inp, out, vae="pixel", resolution=16, flip=True, batch_size=2))
    assert (res.done, res.samples_in, res.samples_out, res.failed) == (2, 6, 4, 2)
    assert res.summary["failures_by_reason"] == {"bad_clip": 1, "no_media": 1}
    _assert_input_fields_carried(inp, out, dropped={"bad", "nomedia"})

    pixel = load_vae("pixel")
    samples = {k: f for shard in _read(out).values() for k, f in shard}
    for key, fields in samples.items():
        mean, std = schema.decode_npy(fields[schema.LATENT_MEAN]), schema.decode_npy(fields[schema.LATENT_STD])
        flip_mean = schema.decode_npy(fields[schema.LATENT_FLIP_MEAN])
        assert mean.dtype == np.float16 and not std.any()
        if key.startswith("c"):
            source = media.decode_clip(fields[schema.VIDEO])
            assert mean.shape == (8, 3, 16, 16)
        else:
            source = media.decode_image(fields["png" if "png" in fields else "jpg"])[None]
            assert mean.shape == (3, 16, 16)
            mean, flip_mean = mean[None], flip_mean[None]
        if key in ("c0", "i2"):  # short side already 16: the stored pixels are the center crop, exactly
            expected = source[:, :, 4:20]
        elif key == "c5":
            expected = source[:, 4:20, :]
        else:
            expected = CoverCrop.square(16)(source)[0]
        np.testing.assert_array_equal(pixel.decode(torch.from_numpy(mean)), expected)
        np.testing.assert_array_equal(pixel.decode(torch.from_numpy(flip_mean)), expected[:, :, ::-1])
        latent = schema.decode_json(fields[schema.META])["latent"]
        assert latent["vae"] == "pixel" and latent["flip"] is True and latent["resolution"] == 16
        assert latent["shape"] == list(schema.decode_npy(fields[schema.LATENT_MEAN]).shape)
        assert latent["crop"]["source_size"] == list(source.shape[1:3])


def test_encode_latents_tiny_vae_equals_direct_vae_calls(tmp_path, tiny_encoders):
    samples = [
        ("c0", _sample("clip", 0, h=16, w=16)),
        ("i1", _sample("png", 1, h=16, w=16)),
        ("c2", _sample("clip", 2, h=16, w=16)),
    ]
    inp = _write_shards(tmp_path / "in", [samples])
    out = tmp_path / "out"
    res = encode_latents(
        EncodeLatentsConfig(inp, out, vae=str(tiny_encoders["vae"]), resolution=16, batch_size=3, device="cpu")
    )
    assert res.samples_out == 3
    vae = load_vae(str(tiny_encoders["vae"]), device="cpu")
    for _key, fields in _read(out)["000000.tar"]:
        frames = (
            media.decode_clip(fields[schema.VIDEO])
            if schema.VIDEO in fields
            else media.decode_image(fields["png"])[None]
        )
        mean, std = vae.encode(frames)  # one sample alone, where the stage batched three
        stored_mean, stored_std = (
            schema.decode_npy(fields[schema.LATENT_MEAN]),
            schema.decode_npy(fields[schema.LATENT_STD]),
        )
        if schema.VIDEO not in fields:
            stored_mean, stored_std = stored_mean[None], stored_std[None]
        assert stored_mean.shape == (len(frames), 4, 2, 2)
        np.testing.assert_allclose(stored_mean.astype(np.float32), mean.numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(stored_std.astype(np.float32), std.numpy(), atol=2e-3, rtol=2e-3)
        latent = schema.decode_json(fields[schema.META])["latent"]
        assert (latent["channels"], latent["downsample"], latent["scaling_factor"]) == (4, 8, vae.scaling_factor)
    with pytest.raises(Exception) as err:
        encode_latents(
            EncodeLatentsConfig(inp, tmp_path / "x", vae=str(tiny_encoders["vae"]), resolution=20, device="cpu")
        )
    assert "multiple of the VAE's downsampling factor 8" in str(err.value)


# ---------------------------------------------------------------------------------------------
# encode-text


def test_a_relative_vae_folder_is_recorded_as_an_absolute_path(tmp_path, tiny_encoders, monkeypatch):
    """Sampling reads the VAE from the record: a relative folder would name another folder from another working
    folder."""
    import shutil

    shutil.copytree(tiny_encoders["vae"], tmp_path / "vaes" / "mine")
    inp = _write_shards(tmp_path / "in", [[("i0", _sample("png", 0, h=16, w=16))]])
    monkeypatch.chdir(tmp_path)
    encode_latents(EncodeLatentsConfig(inp, tmp_path / "out", vae="vaes/mine", resolution=16, device="cpu"))
    expected = str(tmp_path / "vaes" / "mine")
    assert json.loads((tmp_path / "out" / "_encode_latents.json").read_text())["vae"] == expected
    [(_key, fields)] = _read(tmp_path / "out")["000000.tar"]
    assert json.loads(fields[schema.META])["latent"]["vae"] == expected
    # the same relative folder given again resumes (one record, whatever the spelling)
    assert (
        encode_latents(
            EncodeLatentsConfig(inp, tmp_path / "out", vae="./vaes/mine", resolution=16, device="cpu")
        ).skipped
        == 1
    )


def test_relative_text_encoder_folders_are_recorded_as_absolute_paths(tmp_path, tiny_encoders, monkeypatch):
    import shutil

    for name in ("clip", "t5"):
        shutil.copytree(tiny_encoders[name], tmp_path / "enc" / name)
    inp = _write_shards(tmp_path / "in", [[("i0", {"txt": b"a red square"})]])
    monkeypatch.chdir(tmp_path)
    encode_text(EncodeTextConfig(inp, tmp_path / "out", clip="enc/clip", t5="./enc/t5", device="cpu"))
    [(_key, fields)] = _read(tmp_path / "out")["000000.tar"]
    text = json.loads(fields[schema.META])["text"]
    assert (text["clip"]["name"], text["t5"]["name"]) == (str(tmp_path / "enc" / "clip"), str(tmp_path / "enc" / "t5"))


def test_encode_text_values_failures_counters_and_empty_caption_once(tmp_path, tiny_encoders):
    long_caption = " ".join(["photo"] * 120)  # over 77 CLIP tokens and 120 bytes
    captions = {
        "k0": "a red car at night",
        "k1": "",
        "k2": "   ",
        "k3": "a dog",
        "k4": long_caption,
        "k5": "ünïcödé 🙂",
    }
    shard0 = [(k, _sample("none", i, c)) for i, (k, c) in enumerate(captions.items())]
    bad = _sample("none", 9)
    bad[schema.CAPTION] = b"\xff\xfe broken"
    no_caption = _sample("none", 10)
    del no_caption[schema.CAPTION]
    shard1 = [("k6", _sample("none", 6, "two people in a park")), ("bad", bad), ("nocap", no_caption)]
    inp = _write_shards(tmp_path / "in", [shard0, shard1])
    out = tmp_path / "out"
    encoders = TextEncoders(clip=str(tiny_encoders["clip"]), t5=str(tiny_encoders["t5"]), device="cpu")
    res = encode_text(EncodeTextConfig(inp, out, batch_size=2), encoders=encoders)
    assert (res.samples_in, res.samples_out, res.failed) == (9, 5, 4)
    assert res.summary["failures_by_reason"] == {"caption_not_utf8": 1, "empty_caption": 2, "no_caption": 1}
    assert res.summary["counters"] == {"truncated_clip": 1, "truncated_t5": 1}
    _assert_input_fields_carried(inp, out, dropped={"k1", "k2", "bad", "nocap"})

    for key, fields in (s for shard in _read(out).values() for s in shard):
        direct = encoders.encode([schema.decode_caption(fields[schema.CAPTION])])[0]  # alone, unbatched
        for array_name, field in (
            ("clip", schema.CLIP_TOKENS),
            ("clip_pooled", schema.CLIP_POOLED),
            ("t5", schema.T5_TOKENS),
        ):
            stored = schema.decode_npy(fields[field])
            assert stored.dtype == np.float16 and stored.shape == direct[array_name].shape
            np.testing.assert_allclose(
                stored.astype(np.float32), direct[array_name].astype(np.float32), atol=2e-3, rtol=2e-3
            )
        text = schema.decode_json(fields[schema.META])["text"]
        assert text["tokens"] == {"clip": len(direct["clip"]), "t5": len(direct["t5"])}
        assert text["truncated"] == (["clip", "t5"] if key == "k4" else [])
        assert text["clip"]["name"] == str(tiny_encoders["clip"]) and text["t5"]["max_length"] == 120

    empty = out / schema.EMPTY_CAPTION_FILE
    with np.load(empty) as stored:
        reference = encoders.encode([""])[0]
        assert set(stored.files) == {"clip", "clip_pooled", "t5"}
        for name in stored.files:
            np.testing.assert_array_equal(stored[name], reference[name])
    before = (empty.stat().st_ino, empty.stat().st_mtime_ns)
    (out / "000001.stats.json").unlink()  # one shard to redo
    res2 = encode_text(EncodeTextConfig(inp, out, batch_size=2), encoders=encoders)
    assert (res2.done, res2.skipped) == (1, 1)
    assert (empty.stat().st_ino, empty.stat().st_mtime_ns) == before  # written once per folder
    assert not list(out.glob(".*tmp*"))
    t5_only = TextEncoders(clip=None, t5=str(tiny_encoders["t5"]), device="cpu")
    with pytest.raises(Exception) as err:  # the folder was made with other encoders (its options record says so)
        encode_text(EncodeTextConfig(inp, out, encoders="t5"), encoders=t5_only)
    assert "different options (encoders)" in str(err.value)
    with pytest.raises(Exception) as err:  # same options, other encoders passed in: the empty caption tells
        encode_text(EncodeTextConfig(inp, out), encoders=t5_only)
    assert "empty_caption.npz" in str(err.value)


def test_encode_text_carries_latent_fields_of_a_chained_stage(tmp_path, tiny_encoders):
    inp = _write_shards(tmp_path / "in", [[("c0", _sample("clip", 0)), ("i1", _sample("png", 1))]])
    latents = tmp_path / "latents"
    encode_latents(EncodeLatentsConfig(inp, latents, vae="pixel", resolution=16))
    out = tmp_path / "text"
    encode_text(EncodeTextConfig(latents, out, clip=str(tiny_encoders["clip"]), encoders="clip", device="cpu"))
    _assert_input_fields_carried(latents, out)
    for _, fields in _read(out)["000000.tar"]:
        meta = schema.decode_json(fields[schema.META])
        assert set(meta) == {"prep", "latent", "text"} and meta["text"]["encoders"] == ["clip"]
        assert schema.T5_TOKENS not in fields and schema.CLIP_TOKENS in fields


# ---------------------------------------------------------------------------------------------
# The command line: clear errors in-process, resume and rank split in real processes

# Our commands only, so that other command modules under construction cannot affect these tests.
CLI = (
    "import typer, sys; from gentron_cli.commands import encode; app = typer.Typer(); app.callback()(lambda: None); "
    "encode.register(app); app()"
)


def _cli_app():
    app = typer.Typer()
    app.callback()(lambda: None)
    encode_commands.register(app)
    return app


def test_cli_runs_and_errors_are_one_clear_message(tmp_path, tiny_encoders):
    runner = CliRunner()
    result = runner.invoke(
        _cli_app(), ["encode-latents", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--vae", "pixel"]
    )
    assert result.exit_code == 2 and "input folder not found" in result.output and "Traceback" not in result.output
    inp = _write_shards(tmp_path / "in", [[("k0", _sample("none", 0)), ("k1", _sample("none", 1, caption=""))]])
    args = [
        "encode-text",
        str(inp),
        "--out",
        str(tmp_path / "out"),
        "--clip",
        str(tmp_path / "no_clip_here"),
        "--encoders",
        "clip",
    ]
    result = runner.invoke(_cli_app(), args)
    assert result.exit_code == 2 and "no_clip_here" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        _cli_app(),
        ["encode-latents", str(inp), "-o", str(tmp_path / "o2"), "--vae", "pixel", "--resolution", "16"],
        env={"COLUMNS": "1000"},
    )
    assert result.exit_code == 2, result.output  # a stage that keeps nothing fails, with the reasons counted
    assert "kept nothing: all 2 inputs failed (no_media: 2)" in result.output and "Traceback" not in result.output
    args = [
        "encode-text",
        str(inp),
        "--out",
        str(tmp_path / "o3"),
        "--clip",
        str(tiny_encoders["clip"]),
        "--t5",
        str(tiny_encoders["t5"]),
        "--device",
        "cpu",
    ]
    result = runner.invoke(_cli_app(), args)
    assert result.exit_code == 0, result.output
    assert "1 of 2 samples written, 1 failed" in result.output and "empty_caption" in result.output
    assert (tmp_path / "o3" / schema.EMPTY_CAPTION_FILE).exists()


# The subprocess tests use the pixel VAE: no transformers/diffusers import, and exact, deterministic output.


def _env(**extra):
    return os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"} | extra


def _clip_shards(folder, shards, per_shard, h, w):
    return _write_shards(
        folder,
        [[(f"c{s}_{i}", _sample("clip", 10 * s + i, h=h, w=w)) for i in range(per_shard)] for s in range(shards)],
    )


def test_resume_after_sigkill_gives_the_same_shards(tmp_path):
    inp = _clip_shards(tmp_path / "in", shards=16, per_shard=3, h=48, w=64)  # resized to 32: some work per shard
    killed = tmp_path / "killed"
    args = [
        "encode-latents",
        str(inp),
        "--out",
        str(killed),
        "--vae",
        "pixel",
        "--resolution",
        "32",
        "--batch-size",
        "1",
        "--flip",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 120
    while not list(killed.glob("*.stats.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(killed.glob("*.stats.json")))
    assert 1 <= done_at_kill < 16, proc.stdout.read().decode()[-2000:]  # really killed mid-way

    cfg = dict(vae="pixel", resolution=32, batch_size=1, flip=True)
    res = encode_latents(EncodeLatentsConfig(inp, killed, **cfg))
    assert (res.done, res.skipped) == (16 - done_at_kill, done_at_kill)
    reference = tmp_path / "reference"
    encode_latents(EncodeLatentsConfig(inp, reference, **cfg))
    assert [p.name for p in list_shards(killed)] == [p.name for p in list_shards(reference)]
    for a, b in zip(list_shards(killed), list_shards(reference)):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert not list(killed.glob(".*tmp*"))


def test_rank_split_covers_every_shard_once(tmp_path):
    inp = _clip_shards(tmp_path / "in", shards=5, per_shard=2, h=16, w=16)
    out = tmp_path / "out"
    args = ["encode-latents", str(inp), "--out", str(out), "--vae", "pixel", "--resolution", "16"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLI, *args],
            env=_env(RANK=str(r), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert (
        "3 shards done" in outputs[0] and "2 shards done" in outputs[1]
    )  # jobs[rank::2] of 5: together all, none twice
    single = tmp_path / "single"
    encode_latents(EncodeLatentsConfig(inp, single, vae="pixel", resolution=16))
    assert (
        [p.name for p in list_shards(out)]
        == [p.name for p in list_shards(single)]
        == [f"{s:06d}.tar" for s in range(5)]
    )
    for a, b in zip(list_shards(out), list_shards(single)):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert all(json.loads((out / f"{s:06d}.stats.json").read_text())["samples_out"] == 2 for s in range(5))


# --------------------------------------------------------------------------- hostile cases


def test_encode_text_records_a_duplicate_key_in_its_stats(tmp_path):
    from pipelines.data.shards import ShardStats
    from pipelines.encode.text import TextShardEncoder

    tar_with_a_duplicate(tmp_path / "000000.tar")

    class Encoders:
        def metadata(self):
            return {}

        def encode_captions(self, texts):
            raise AssertionError("not reached: batch size is larger than the shard")

    stats = ShardStats("000000")
    encoder = TextShardEncoder(Encoders(), batch_size=64)
    encoder._encode_batch = lambda batch, writer, stats, tick: None
    encoder(ShardJob("000000", tmp_path / "000000.tar"), None, stats, lambda n=1, **_: None)
    assert [(f.key, f.reason) for f in stats.failures] == [("a", "duplicate_key"), ("c", "duplicate_key")]
    assert stats.samples_in == 5


# --------------------------------------------------------------------------- encode-latents upscaling a small clip


def test_encode_latents_counts_and_says_when_it_upscales_a_small_source(tmp_path):
    import numpy as np

    from pipelines.data import media, schema
    from pipelines.encode.latents import EncodeLatentsConfig, encode_latents

    (tmp_path / "in").mkdir()
    with ShardWriter(tmp_path / "in" / "000000.tar") as writer:
        for key, side in (("small", 8), ("big", 16)):
            frames = np.full((2, side, side, 3), 100, np.uint8)
            writer.write(key, {schema.VIDEO: media.encode_clip(frames, fps=4), schema.CAPTION: b"a clip"})
    log = LogLines()
    result = encode_latents(EncodeLatentsConfig(tmp_path / "in", tmp_path / "out", vae="pixel", resolution=16), log)
    assert result.summary["counters"]["upscaled_samples"] == 1
    assert any("1 of 2 samples" in m and "upscaled" in m for m in log.lines)


def test_an_input_shard_that_could_not_be_read_is_made_again_on_the_next_run(tmp_path, monkeypatch):
    import errno
    import tarfile

    inp = _write_shards(tmp_path / "in", [[(f"s{i}", _sample("png", i)) for i in range(2)] for _ in range(2)])
    config = EncodeLatentsConfig(inp, tmp_path / "out", vae="pixel", resolution=16)
    real_open = tarfile.open

    def hiccup(name=None, *args, **kwargs):  # the network filesystem fails once on the second input shard
        if str(name).endswith("000001.tar"):
            raise OSError(errno.EIO, "Input/output error", str(name))
        return real_open(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tarfile, "open", hiccup)
        first = encode_latents(config)
    ((failure),) = first.summary["failures_by_reason"].items()
    assert failure == ("read_error", 1) and first.summary["shards_to_redo"] == ["000001"]
    assert first.samples_in == 2  # the unreadable shard is one failure, not a sample
    again = encode_latents(config)
    assert (again.skipped, again.done, again.failed) == (1, 1, 0)
    reference = encode_latents(EncodeLatentsConfig(inp, tmp_path / "reference", vae="pixel", resolution=16))
    assert reference.failed == 0
    assert _read(tmp_path / "out") == _read(tmp_path / "reference")


def test_input_keys_with_folders_come_out_as_they_went_in(tmp_path):
    import webdataset as wds

    (tmp_path / "in").mkdir()
    with ShardWriter(tmp_path / "in" / "000000.tar") as writer:  # as a WebDataset writer with folders makes them
        for key in ("cats/0001", "dogs/0001", "dogs/0002"):
            writer.write(key, _sample("png", len(key)))
    result = encode_latents(EncodeLatentsConfig(tmp_path / "in", tmp_path / "out", vae="pixel", resolution=16))
    assert result.failed == 0 and result.samples_out == 3
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / "000000.tar"), shardshuffle=False)]
    assert keys == ["cats/0001", "dogs/0001", "dogs/0002"]


def test_a_shard_the_stage_before_made_again_is_encoded_again(tmp_path, monkeypatch):
    """prep-images redoes a shard that held a transient failure; encode-latents then sees its input changed and
    encodes that shard again (and only it): the chain ends as if nothing had failed."""
    from PIL import Image

    from pipelines.prep.images import PrepImagesConfig, prep_images

    src = tmp_path / "images"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_frames(1, 24, 24, i)[0]).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"image {i}")
    prep = PrepImagesConfig(src, tmp_path / "prep", size=16, shard_size=2)
    encode = EncodeLatentsConfig(tmp_path / "prep", tmp_path / "latents", vae="pixel", resolution=16)
    real_read = Path.read_bytes

    def hiccup(self):  # the network filesystem fails on one image, once
        if self == src / "3.png":
            raise OSError(5, "Input/output error", str(self))
        return real_read(self)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_bytes", hiccup)
        assert prep_images(prep).summary["shards_to_redo"] == ["000001"]
    assert encode_latents(encode).samples_out == 3  # encoded what there was
    assert prep_images(prep).done == 1  # the cause passed: prep makes shard 000001 again
    again = encode_latents(encode)
    assert (again.skipped, again.done, again.samples_out) == (1, 1, 2)
    prep_images(PrepImagesConfig(src, tmp_path / "prep_ref", size=16, shard_size=2))
    encode_latents(EncodeLatentsConfig(tmp_path / "prep_ref", tmp_path / "latents_ref", vae="pixel", resolution=16))
    assert _read(tmp_path / "latents") == _read(tmp_path / "latents_ref")
