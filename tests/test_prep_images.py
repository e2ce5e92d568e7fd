"""prep-images: normalisation of awkward files (checked on pixel values), crop geometry, bad inputs."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.image import load_image, resize_image
from pipelines.data.media import decode_image
from pipelines.data.shards import iter_shard, list_shards
from pipelines.errors import GentronError
from pipelines.prep.images import PrepImagesConfig, prep_images


def _samples(folder):
    out = {}
    for shard in list_shards(folder):
        for key, fields in iter_shard(shard):
            image_field = next(f for f in fields if f in schema.IMAGE_FIELDS)
            out[key] = {
                "pixels": decode_image(fields[image_field]),
                "field": image_field,
                "caption": fields[schema.CAPTION].decode(),
            }
            out[key] |= schema.decode_json(fields[schema.META])["prep"]
    return out


def _failures(folder):
    out = {}
    for p in folder.glob("*.stats.json"):
        out |= {f["key"]: f["reason"] for f in json.loads(p.read_text())["failures"]}
    return out


def _quadrants(width: int, height: int) -> np.ndarray:
    """Top-left red, top-right green, bottom-left blue, bottom-right white."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    image[height // 2 :, : width // 2] = (0, 0, 255)
    image[height // 2 :, width // 2 :] = (255, 255, 255)
    return image


def _near(pixel, colour, tol=40) -> bool:
    return bool(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)).max() <= tol)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = tmp_path_factory.mktemp("images") / "in"
    src.mkdir()
    Image.fromarray(_quadrants(200, 100)).save(src / "wide.png")
    # EXIF orientation 6 (rotate 90 CW to view): stored 100 wide x 200 tall, viewed 200x100
    stored = np.rot90(_quadrants(200, 100), k=1)  # what a camera writes before its orientation tag
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(src / "rotated.jpg", exif=exif.tobytes(), quality=98)
    Image.fromarray(_quadrants(120, 120)).convert("CMYK").save(src / "cmyk.jpg", quality=98)
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[:, :48] = (255, 0, 0, 255)  # left opaque red, right fully transparent
    Image.fromarray(rgba, "RGBA").save(src / "transparent.png")
    palette = Image.fromarray(_quadrants(100, 100)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = palette.getpixel((99, 99))  # the white quadrant's index: stays white
    palette.save(src / "palette.png", transparency=palette.info["transparency"])
    gray16 = np.full((80, 80), 65535 // 4, np.uint16)
    gray16[:, 40:] = 65535
    Image.fromarray(gray16).save(src / "gray16.png")
    Image.fromarray(np.full((90, 90), 128, np.uint8), "L").save(src / "gray.png")
    Image.fromarray(_quadrants(40, 40)).save(src / "tiny.png")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(200))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:2000])
    (src / "empty.png").write_bytes(b"")
    Image.fromarray(_quadrants(100, 100)).save(src / "uncaptioned.png")
    for p in src.iterdir():
        if p.stem != "uncaptioned":
            p.with_suffix(".txt").write_text(f"{p.stem} picture")
    out = src.parent / "out"
    result = prep_images(PrepImagesConfig(src, out, size=64, shard_size=5))
    return src, out, result


def test_crop_geometry_and_exif_rotation_on_pixels(prepared):
    _, out, _ = prepared
    s = _samples(out)
    for key in ("wide", "rotated"):
        image = s[key]["pixels"]
        assert image.shape == (64, 64, 3) and s[key]["size"] == [64, 64]
        assert s[key]["source_size"] == [200, 100] and s[key]["crop_box"] == [32, 0, 96, 64]
        # the centered square of a 128x64 quadrant image: the quadrant boundary is in the middle
        assert _near(image[8, 8], (255, 0, 0)) and _near(image[8, 56], (0, 255, 0))
        assert _near(image[56, 8], (0, 0, 255)) and _near(image[56, 56], (255, 255, 255))
    assert s["rotated"]["exif_transposed"] and not s["wide"]["exif_transposed"]
    assert s["wide"]["caption"] == "wide picture" and s["wide"]["field"] == "jpg"


def test_awkward_modes_become_rgb(prepared):
    _, out, _ = prepared
    s = _samples(out)
    assert s["cmyk"]["source_mode"] == "CMYK" and _near(s["cmyk"]["pixels"][8, 8], (255, 0, 0), 60)
    t = s["transparent"]["pixels"]
    assert _near(t[32, 8], (255, 0, 0)) and _near(t[32, 56], (255, 255, 255), 5)  # transparent -> white
    p = s["palette"]["pixels"]
    assert s["palette"]["source_mode"] == "P" and _near(p[8, 8], (255, 0, 0)) and _near(p[56, 56], (255, 255, 255), 5)
    g = s["gray16"]["pixels"]
    assert (
        s["gray16"]["source_mode"].startswith("I")
        and _near(g[32, 8], (64, 64, 64), 3)
        and _near(g[32, 56], (255, 255, 255), 3)
    )
    assert _near(s["gray"]["pixels"][32, 32], (128, 128, 128), 3)
    assert s["gray"]["upscaled"] is False and s["wide"]["upscaled"] is False


def test_bad_images_are_counted_and_skipped(prepared):
    _, out, result = prepared
    assert _failures(out) == {
        "tiny": "too_small",
        "corrupt": "corrupt",
        "truncated": "corrupt",
        "empty": "corrupt",
        "uncaptioned": "missing_caption",
    }
    assert result.samples_in == 12 and result.samples_out == 7 == len(_samples(out))


def test_upscale_no_crop_png_and_keep_uncaptioned(prepared, tmp_path):
    src, _, _ = prepared
    prep_images(
        PrepImagesConfig(src, tmp_path / "o", size=64, crop=False, format="png", min_size=0, keep_uncaptioned=True)
    )
    s = _samples(tmp_path / "o")
    assert s["tiny"]["upscaled"] and s["tiny"]["pixels"].shape == (64, 64, 3) and s["tiny"]["field"] == "png"
    assert s["wide"]["pixels"].shape == (64, 128, 3) and s["wide"]["crop_box"] == [0, 0, 128, 64]
    # PNG is lossless: the resized image equals a direct bicubic resize of the source
    reference = np.asarray(Image.open(src / "wide.png").convert("RGB").resize((128, 64), Image.Resampling.BICUBIC))
    assert np.array_equal(s["wide"]["pixels"], reference)
    assert s["uncaptioned"]["caption"] == "" and set(_failures(tmp_path / "o").values()) == {"corrupt"}


def test_reproducible_shards(prepared, tmp_path):
    src, out, _ = prepared
    prep_images(PrepImagesConfig(src, tmp_path / "again", size=64, shard_size=5))
    assert [p.read_bytes() for p in list_shards(out)] == [p.read_bytes() for p in list_shards(tmp_path / "again")]


def test_resize_image_portrait_and_load_errors(tmp_path):
    image, box = resize_image(_quadrants(50, 100), 20, crop=True)
    assert image.shape == (20, 20, 3) and box == [0, 10, 20, 30]
    image, box = resize_image(_quadrants(50, 100), 20, crop=False)
    assert image.shape == (40, 20, 3)
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from pipelines.errors import BadSample

    with pytest.raises(BadSample) as err:
        load_image(tmp_path / "x.png")
    assert err.value.reason == "corrupt" and "x.png" in err.value.detail


def test_cli(prepared, tmp_path):
    from gentron_cli.commands import prep

    app = typer.Typer()
    prep.register(app)
    src, _, _ = prepared
    runner = CliRunner()
    ok = runner.invoke(app, ["prep-images", str(src), "--out", str(tmp_path / "o"), "--size", "32", "--format", "png"])
    assert ok.exit_code == 0, ok.output
    assert "12 images -> 8 images" in ok.output  # --min-size defaults to --size when that is below 64
    bad = runner.invoke(app, ["prep-images", str(tmp_path / "missing"), "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and str(tmp_path / "missing") in bad.output and "Traceback" not in bad.output
    bad_format = runner.invoke(app, ["prep-images", str(src), "--out", str(tmp_path / "o3"), "--format", "gif"])
    assert bad_format.exit_code == 2 and "--format" in bad_format.output
    with pytest.raises(GentronError):
        prep_images(PrepImagesConfig(src, tmp_path / "o4", quality=0))


# --------------------------------------------------------------------------- hostile cases


runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no path folded mid-word in the CLI's messages


def _image(path: pathlib.Path, side: int, caption: str = "a grey square") -> pathlib.Path:
    """A `side` x `side` PNG with a same-stem caption file."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(path)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def test_a_read_only_output_folder_ends_prep_images_with_exit_2(tmp_path, monkeypatch):
    _image(tmp_path / "in" / "a.png", 64)
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *a, **k):
        if "out" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    result = runner.invoke(app, ["prep-images", str(tmp_path / "in"), "--out", str(tmp_path / "out")], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "read-only" in result.output and str(tmp_path / "out") in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- inputs that vanished without a word


def _stage_failures(folder) -> dict[str, str]:
    out = {}
    for p in pathlib.Path(folder).glob("*.stats.json"):
        out |= {f["key"]: f["reason"] for f in json.loads(p.read_text())["failures"]}
    return out


def test_broken_symlink_is_missing_file_and_caption_bom_is_stripped(tmp_path):
    from pipelines.data.shards import iter_shard
    from pipelines.prep.images import PrepImagesConfig, prep_images

    src = tmp_path / "in"
    _image(src / "good.png", 64)
    (src / "good.txt").write_bytes("\ufeffa grey square".encode("utf-8"))
    (src / "gone.png").symlink_to(src / "nowhere.png")
    (src / "gone.txt").write_text("a caption")
    result = prep_images(PrepImagesConfig(src, tmp_path / "out", size=64))
    assert result.samples_in == 2 and result.samples_out == 1
    assert _stage_failures(tmp_path / "out") == {"gone": "missing_file"}
    ((_, fields),) = iter_shard(list_shards(tmp_path / "out")[0])
    assert fields["txt"] == b"a grey square"


# --------------------------------------------------------------------------- a stage that keeps nothing


def test_prep_images_at_32_px_keeps_32_px_images_and_a_stage_keeping_nothing_exits_2(tmp_path):
    src = tmp_path / "in"
    _image(src / "a.png", 32)
    _image(src / "b.png", 32)
    ok = runner.invoke(app, ["prep-images", str(src), "--out", str(tmp_path / "out"), "--size", "32"], env=WIDE)
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["samples_out"] == 2

    (src / "a.txt").unlink()
    (src / "b.txt").unlink()
    none = runner.invoke(app, ["prep-images", str(src), "-o", str(tmp_path / "none"), "--size", "32"], env=WIDE)
    assert none.exit_code == 2 and "Traceback" not in none.output
    assert "kept nothing" in none.output and "missing_caption: 2" in none.output


# --------------------------------------------------------------------------- one odd input must not stop a run


def _failing_reads(monkeypatch, failures: dict[pathlib.Path, int]) -> None:
    """Reading the bytes of each named file fails with that errno (as root, permissions cannot make it fail)."""
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self in failures:
            raise OSError(failures[self], os.strerror(failures[self]), str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)


def test_odd_inputs_are_skipped_and_named_with_a_fix_that_fits_and_the_run_goes_on(tmp_path, monkeypatch):
    src = tmp_path / "in"
    for name in ("good", "folder_caption", "locked_caption", "locked_image", "io_error"):
        _image(src / f"{name}.png", 64)
    (src / "folder_caption.txt").unlink()
    (src / "folder_caption.txt").mkdir()  # a caption path that is a folder
    (src / "loop_a.png").symlink_to(src / "loop_b.png")  # a symlink loop
    (src / "loop_b.png").symlink_to(src / "loop_a.png")
    os.mkfifo(src / "fifo.png")  # reading it would wait for ever
    (src / "zero.png").symlink_to("/dev/zero")  # a device: reading it never ends
    for name in ("loop_a", "loop_b", "fifo", "zero"):
        (src / f"{name}.txt").write_text("a caption")
    _failing_reads(
        monkeypatch,
        {
            src / "locked_caption.txt": errno.EACCES,
            src / "locked_image.png": errno.EACCES,
            src / "io_error.png": errno.EIO,
        },
    )
    result = runner.invoke(app, ["prep-images", str(src), "-o", str(tmp_path / "out"), "--size", "64"], env=WIDE)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    stats = json.loads(next((tmp_path / "out").glob("*.stats.json")).read_text())
    failures = {f["key"]: f for f in stats["failures"]}
    assert {key: (f["reason"], f["transient"]) for key, f in failures.items()} == {
        "folder_caption": ("not_a_file", False),
        "locked_caption": ("permission_denied", True),
        "locked_image": ("permission_denied", True),
        "io_error": ("read_error", True),
        "loop_a": ("symlink_loop", False),
        "loop_b": ("symlink_loop", False),
        "fifo": ("not_a_file", False),
        "zero": ("not_a_file", False),
    }
    assert stats["samples_in"] == 9 and stats["samples_out"] == 1  # "good" went through
    # each detail names the file and a fix for its own case (not "write the output to a folder you may write to")
    assert str(src / "folder_caption.txt") in failures["folder_caption"]["detail"]
    assert "is a folder" in failures["folder_caption"]["detail"]
    assert str(src / "locked_caption.txt") in failures["locked_caption"]["detail"]
    assert "make it readable" in failures["locked_image"]["detail"] and "I/O" in failures["io_error"]["detail"]
    assert "points" in failures["loop_a"]["detail"] and "device" in failures["zero"]["detail"]
    assert "may pass" in result.output and "made again" in result.output  # the transient ones: said at the end


def test_a_shard_with_transient_failures_is_made_again_until_they_pass(tmp_path, monkeypatch):
    src = tmp_path / "in"
    for i in range(4):
        _image(src / f"{i}.png", 64 + 8 * i)
    config = PrepImagesConfig(src, tmp_path / "out", size=32, shard_size=2)
    reference = tmp_path / "reference"
    prep_images(PrepImagesConfig(src, reference, size=32, shard_size=2))
    with monkeypatch.context() as patch:  # a network filesystem hiccup on one image of shard 000001
        _failing_reads(patch, {src / "3.png": errno.EIO})
        first = prep_images(config)
    assert (first.samples_out, first.failed) == (3, 1)
    assert first.summary["transient"] == 1 and first.summary["shards_to_redo"] == ["000001"]
    stats = runner.invoke(app, ["stats", str(tmp_path / "out")], env=WIDE)
    assert "may pass" in stats.output and "000001" in stats.output
    again = prep_images(config)  # the cause has passed: only the shard that held it is made again
    assert (again.skipped, again.done, again.failed) == (1, 1, 0)
    assert again.summary["transient"] == 0 and again.summary["shards_to_redo"] == []
    assert [p.read_bytes() for p in list_shards(tmp_path / "out")] == [p.read_bytes() for p in list_shards(reference)]
    assert prep_images(config).done == 0  # complete now: nothing to redo


def test_pictures_pillow_cannot_read_are_counted_not_left_out(tmp_path):
    src = tmp_path / "in"
    _image(src / "good.png", 64)
    # the start of an iPhone HEIC: an ISO-BMFF `ftyp` box of brand heic (Pillow needs a plugin for the rest)
    (src / "photo.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    (src / "photo.txt").write_text("a photo")
    result = prep_images(PrepImagesConfig(src, tmp_path / "out", size=64))
    assert result.samples_in == 2 and result.samples_out == 1
    stats = json.loads(next((tmp_path / "out").glob("*.stats.json")).read_text())
    ((failure),) = stats["failures"]
    assert (failure["key"], failure["reason"]) == ("photo", "unreadable_format")
    assert "HEIC" in failure["detail"] and "convert them to JPEG or PNG" in failure["detail"]


def test_a_display_p3_photo_is_converted_to_srgb_and_says_so(tmp_path):
    from icc import P3, icc_profile, p3_to_srgb

    src = tmp_path / "in"
    src.mkdir()
    colours = np.array([[200, 100, 50], [90, 160, 110], [120, 120, 200], [128, 128, 128]], np.uint8)
    pixels = np.repeat(np.repeat(colours.reshape(2, 2, 3), 16, axis=0), 16, axis=1)  # four 16 px blocks, 32 x 32
    Image.fromarray(pixels).save(src / "p3.png", icc_profile=icc_profile("Display P3 (test)", P3))
    Image.fromarray(pixels).save(src / "plain.png")  # no profile: taken as sRGB, as before
    for name in ("p3", "plain"):
        (src / f"{name}.txt").write_text("four colours")
    result = prep_images(PrepImagesConfig(src, tmp_path / "out", size=32, format="png"))
    s = _samples(tmp_path / "out")
    expected = p3_to_srgb(colours)  # the colour maths done directly, not by littlecms
    for block, (y, x) in enumerate([(8, 8), (8, 24), (24, 8), (24, 24)]):
        assert np.abs(s["p3"]["pixels"][y, x].astype(int) - expected[block]).max() <= 1
        assert np.array_equal(s["plain"]["pixels"][y, x], colours[block])
    assert s["p3"]["color_profile"] == {"name": "Display P3 (test)", "converted_to_srgb": True}
    assert "color_profile" not in s["plain"]
    assert result.summary["counters"]["color_profiles_converted"] == 1
