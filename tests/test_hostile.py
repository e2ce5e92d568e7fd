"""Hostile inputs and faults (issue #13): each case gets one clear message, loses nothing else, and no
setting is silently ignored. Cheap by design: synthetic data, simulated faults (monkeypatched OSErrors)."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest
from tiny import TINY_SPEC
from typer.testing import CliRunner

from gentron_cli.main import app
from gentron_cli.reporting import run_command
from pipelines.data.runner import ShardJob, run_shard_jobs
from pipelines.data.shards import ShardWriter, list_shards, shard_name
from pipelines.errors import GentronError
from pipelines.progress import NullReporter

runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no path folded mid-word in the CLI's messages


def _fn(job, writer, stats, tick):
    for i in job.payload:
        stats.samples_in += 1
        writer.write(f"item_{i}", {"txt": f"caption {i}".encode() * 20})
        tick(1)


def _image(path: pathlib.Path, side: int, caption: str = "a grey square") -> pathlib.Path:
    """A `side` x `side` PNG with a same-stem caption file."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(path)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _jobs(shards=3, per_shard=4):
    return [
        ShardJob(shard_name(k), list(range(k * per_shard, (k + 1) * per_shard)), items=per_shard) for k in range(shards)
    ]


# --------------------------------------------------------------------------- a damaged output folder


def test_rerun_redoes_a_missing_a_truncated_and_a_garbled_shard_byte_identically(tmp_path):
    out = tmp_path / "out"
    run_shard_jobs(_jobs(), out, _fn)
    reference = {p.name: p.read_bytes() for p in list_shards(out)}
    (out / "000000.tar").unlink()
    data = (out / "000001.tar").read_bytes()
    (out / "000001.tar").write_bytes(data[: len(data) // 2])
    (out / "000002.stats.json").write_text("{ not json")
    log = _Log()
    result = run_shard_jobs(_jobs(), out, _fn, reporter=log)
    assert (result.done, result.skipped) == (3, 0)
    assert {p.name: p.read_bytes() for p in list_shards(out)} == reference
    said = "\n".join(log.lines)
    assert (
        "000000.tar is missing" in said
        and "000001.tar has" in said
        and "000002" in said
        and "stats file is damaged" in said
    )
    stats = json.loads((out / "000000.stats.json").read_text())
    assert stats["tar_size"] == len(reference["000000.tar"]) and len(stats["tar_sha256"]) == 64


def test_verify_redoes_a_tampered_shard_of_the_right_size_and_stats_verify_names_it(tmp_path):
    from pipelines.data.shards import verify_folder

    out = tmp_path / "out"
    run_shard_jobs(_jobs(), out, _fn)
    reference = (out / "000001.tar").read_bytes()
    tampered = bytearray(reference)
    tampered[700] ^= 0xFF  # inside the first member's data: same size, other content
    (out / "000001.tar").write_bytes(bytes(tampered))

    result = runner.invoke(app, ["stats", str(out), "--verify"], env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "000001" in result.output and "sha256" in result.output
    assert [name for name, _ in verify_folder(out)] == ["000001"]

    assert run_shard_jobs(_jobs(), out, _fn).done == 0  # a plain rerun trusts the size
    assert run_shard_jobs(_jobs(), out, _fn, verify=True).done == 1
    assert (out / "000001.tar").read_bytes() == reference
    assert runner.invoke(app, ["stats", str(out), "--verify"], env=WIDE).exit_code == 0


def test_stats_of_a_folder_with_a_garbled_stats_file_names_it_instead_of_a_traceback(tmp_path):
    out = tmp_path / "out"
    run_shard_jobs(_jobs(), out, _fn)
    (out / "000002.stats.json").write_bytes(b"\xff\xfe garbage")
    result = runner.invoke(app, ["stats", str(out)], env=WIDE)
    assert result.exit_code == 0 and "000002.stats.json" in result.output and "damaged" in result.output


# --------------------------------------------------------------------------- storage faults


class _FullDisk:
    """A file on a full disk: every write and the flush on close fail with ENOSPC."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def tell(self):
        return 0

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    flush = close


def test_disk_full_gives_the_stages_message_not_a_second_error_from_cleanup(tmp_path):
    def fill_disk(job, writer, stats, tick):
        writer._file.file = writer._tar.fileobj = _FullDisk()  # the disk fills up under the writer (its AtomicFile)
        writer.write("k", {"txt": b"x" * 10_000})

    with pytest.raises(GentronError) as err:
        run_shard_jobs(_jobs(1), tmp_path / "out", fill_disk)
    assert "disk full while writing" in err.value.message and "000000.tar" in err.value.message
    assert (
        err.value.__context__ is None
        or not isinstance(err.value.__context__, OSError)
        or err.value.__suppress_context__
    )
    assert not list((tmp_path / "out").glob(".000000.tar.tmp-*"))


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EDQUOT, "quota"),
        (errno.ENOSPC, "disk full"),
    ],
)
def test_storage_errors_of_any_stage_are_one_message_naming_the_path(code, words, capsys):
    def body():
        raise OSError(code, os.strerror(code), "/data/out/000003.tar")

    with pytest.raises(SystemExit) as exit_:
        run_command(body)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert words in err.lower() and "/data/out/000003.tar" in err and "fix:" in err


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


# --------------------------------------------------------------------------- two writers


def test_a_second_writer_into_an_output_folder_is_refused_naming_the_holder(tmp_path):
    from pipelines.locking import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(GentronError) as err:
            run_shard_jobs(_jobs(), out, _fn)
    assert (
        str(out) in err.value.message and f"process {os.getpid()}" in err.value.message and "since" in err.value.message
    )
    assert run_shard_jobs(_jobs(), out, _fn).done == 3  # released with its holder


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


def _tar_with_a_duplicate(path: pathlib.Path) -> None:
    """Members a.txt, a.json, b.txt, a.txt: `a` twice, the second time after `b`; and c.txt, c.json, c.txt."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("a.txt", b"first a"),
            ("a.json", b"{}"),
            ("b.txt", b"b"),
            ("a.txt", b"second a"),
            ("c.txt", b"first c"),
            ("c.json", b"{}"),
            ("c.txt", b"second c"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_key_twice_in_one_input_shard_is_recorded_as_duplicate_key_not_merged(tmp_path):
    from pipelines.data.shards import iter_shard

    _tar_with_a_duplicate(tmp_path / "in.tar")
    found = []
    samples = list(iter_shard(tmp_path / "in.tar", on_duplicate=lambda key, detail: found.append(key)))
    assert [(k, f["txt"]) for k, f in samples] == [("a", b"first a"), ("b", b"b"), ("c", b"first c")]
    assert found == ["a", "c"]


def test_encode_text_records_a_duplicate_key_in_its_stats(tmp_path):
    from pipelines.data.shards import ShardStats
    from pipelines.encode.text import TextShardEncoder

    _tar_with_a_duplicate(tmp_path / "000000.tar")

    class Encoders:
        def metadata(self):
            return {}

        def encode_captions(self, texts):
            raise AssertionError("not reached: batch size is larger than the shard")

    stats = ShardStats("000000")
    encoder = TextShardEncoder(Encoders(), batch_size=64)
    encoder._encode_batch = lambda batch, writer, stats, tick: None
    encoder(ShardJob("000000", tmp_path / "000000.tar"), None, stats, lambda n=1, **_: None)
    assert [(f["key"], f["reason"]) for f in stats.failures] == [("a", "duplicate_key"), ("c", "duplicate_key")]
    assert stats.samples_in == 5


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


def test_every_command_a_message_names_exists():
    import re

    import typer.main

    root = pathlib.Path(__file__).resolve().parents[1]
    commands = set(typer.main.get_command(app).commands)
    named = set()
    for path in [*root.glob("pipelines/**/*.py"), *root.glob("gentron_cli/**/*.py")]:
        named |= set(re.findall(r"`gentron ([a-z][a-z0-9-]*)", path.read_text()))
    assert named and named <= commands, f"messages name commands that do not exist: {sorted(named - commands)}"


# --------------------------------------------------------------------------- training and model folders


def _train_config(tmp_path, images, **kw):
    from pipelines.train.trainer import TrainConfig

    defaults = dict(
        output=str(tmp_path / "run"),
        image_data=str(images),
        model=TINY_SPEC,
        steps=2,
        global_batch=4,
        lr=1e-3,
        num_workers=0,
        checkpoint_every=2,
        log_every=1,
        ema_decay=0.9,
    )
    return TrainConfig(**(defaults | kw))


class _Log(NullReporter):
    """A reporter that keeps the stage's messages."""

    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(image data folder, a finished tiny T2I run folder)."""
    from train_data import write_dataset

    from pipelines.train.trainer import train

    root = tmp_path_factory.mktemp("hostile-train")
    images = write_dataset(root / "img", "image", samples=8, shards=2)
    result = train(_train_config(root, images))
    return images, result.run_dir


def _model_variant(tmp_path, run, name, edit=None) -> pathlib.Path:
    import shutil

    folder = tmp_path / name
    shutil.copytree(run / "model", folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "name, edit, words",
    [
        ("depth", lambda c: c.update(depth=-1), "depth must be a whole number of at least 1, got -1"),
        (
            "hidden",
            lambda c: c.update(hidden_size="abc"),
            "hidden_size must be a whole number of at least 1, got 'abc'",
        ),
        ("patch", lambda c: c.update(patch_size=0), "patch_size must be a whole number of at least 1, got 0"),
        ("wider", lambda c: c.update(hidden_size=64), "do not match the model config"),
    ],
)
def test_a_bad_model_config_is_refused_by_name_when_loaded(tmp_path, trained, name, edit, words):
    images, run = trained
    folder = _model_variant(tmp_path, run, name, edit)
    args = [
        "train",
        "--image-data",
        str(images),
        "--init",
        str(folder),
        "-o",
        str(tmp_path / "r"),
        "--steps",
        "1",
        "--num-workers",
        "0",
    ]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert words in result.output and str(folder) in result.output


def test_a_model_config_that_is_not_json_ends_sample_with_exit_2(tmp_path, trained):
    folder = _model_variant(tmp_path, trained[1], "garbled")
    (folder / "config.json").write_text("{ depth: 2,")
    result = runner.invoke(
        app, ["sample", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "o")], env=WIDE
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot be read as JSON" in result.output and str(folder / "config.json") in result.output


def test_pickle_weights_are_refused_by_name_and_never_run(tmp_path, trained):
    import pickle

    folder = _model_variant(tmp_path, trained[1], "pickled")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    args = [
        "train",
        "--image-data",
        str(trained[0]),
        "--init",
        str(folder),
        "-o",
        str(tmp_path / "r"),
        "--steps",
        "1",
        "--num-workers",
        "0",
    ]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "diffusion_pytorch_model.bin" in result.output and "pickle" in result.output
    assert not marker.exists()


def test_resuming_onto_a_checkpoint_of_another_model_size_is_refused(tmp_path, trained):
    import shutil

    from pipelines.train.trainer import train

    images, run = trained
    shutil.copytree(run / "checkpoints", tmp_path / "run" / "checkpoints")  # a T/2 width-32 checkpoint
    wider = '{"size": "T/2", "depth": 2, "hidden_size": 64, "mlp_dim": 64}'
    with pytest.raises(GentronError) as err:
        train(_train_config(tmp_path, images, model=wider, steps=4))
    assert "checkpoint" in err.value.message and "do not match the model config" in err.value.message


def test_init_accepts_a_run_folder_and_records_the_model_trained(tmp_path, trained):
    from pipelines.train.trainer import train

    images, run = trained
    result = train(_train_config(tmp_path, images, model=None, init=str(run)))
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert recorded["init"] == str((run / "model").resolve())
    assert json.loads(recorded["model"])["hidden_size"] == 32 and json.loads(recorded["model"])["depth"] == 2


def test_a_model_that_disagrees_with_the_init_model_is_refused(tmp_path, trained):
    images, run = trained
    args = [
        "train",
        "--image-data",
        str(images),
        "--init",
        str(run),
        "--model",
        "XL/2",
        "-o",
        str(tmp_path / "r"),
        "--steps",
        "1",
        "--num-workers",
        "0",
    ]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "disagrees with the --init model" in result.output and "depth 28" in result.output


def test_flip_without_mirrored_latents_is_said_once_and_recorded_and_t2v_on_stills_warns(tmp_path, trained):
    from pipelines.train.trainer import train

    images, _ = trained
    log = _Log()
    result = train(_train_config(tmp_path, images, flip=True), log)
    said = [m for m in log.lines if "--flip" in m]
    assert len(said) == 1 and "encode-latents --flip" in said[0]
    assert json.loads((result.run_dir / "config.json").read_text())["flip"] is False

    log = _Log()
    train(_train_config(tmp_path, images, output=str(tmp_path / "t2v"), stage="t2v", frames=2, flip=False), log)
    assert any("motion cannot be learnt from stills" in m for m in log.lines)


def test_a_second_train_into_a_run_folder_is_refused_naming_the_holder(tmp_path, trained):
    from pipelines.locking import folder_lock

    images, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run):
        args = [
            "train",
            "--image-data",
            str(images),
            "--model",
            TINY_SPEC,
            "-o",
            str(run),
            "--steps",
            "1",
            "--num-workers",
            "0",
        ]
        result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(run) in result.output and f"process {os.getpid()}" in result.output


# --------------------------------------------------------------------------- Ctrl-C


def test_the_decode_child_leaves_ctrl_c_to_its_parent_and_prints_nothing(capfd):
    import signal
    import time

    from pipelines.data.video import IsolatedProcess

    child = IsolatedProcess(timeout=30)
    child._start()
    os.kill(child._process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, the child too
    time.sleep(1.0)
    assert child._alive()  # the parent handles it and stops the child
    child.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_during_prep_videos_is_one_message_without_child_tracebacks(tmp_path, workers):
    import signal
    import subprocess
    import sys
    import time

    from videos import write_video

    from pipelines.prep.videos import SLEEP_HOOK_ENV

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a", "b"):
        write_video(src / f"{name}.mp4", n_frames=30, fps=25, size=(64, 48))
        (src / f"{name}.txt").write_text("a counter")
    env = os.environ | {SLEEP_HOOK_ENV: ".mp4=60", "COLUMNS": "200"}  # the decode children sleep in their work
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gentron_cli.main",
            "prep-videos",
            str(src),
            "--out",
            str(out),
            "--short-side",
            "32",
            "--shard-size",
            "1",
            "--workers",
            str(workers),
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while len(list(out.glob(".00000*.tar.tmp-*"))) < workers and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # the decode children are up and inside the videos' work
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not list(out.glob("*.stats.json")) and not list(
        out.glob("*.tar")
    )  # nothing counted as done, no shard committed
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the run still alive: {leftover}"  # the decode children are gone too


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
    log = _Log()
    result = encode_latents(EncodeLatentsConfig(tmp_path / "in", tmp_path / "out", vae="pixel", resolution=16), log)
    assert result.summary["counters"]["upscaled_samples"] == 1
    assert any("1 of 2 samples" in m and "upscaled" in m for m in log.lines)


# --------------------------------------------------------------------------- progress where nobody has a terminal


def _plain_reporter(monkeypatch, clock):
    import io

    from rich.console import Console

    import gentron_cli.reporting as reporting

    monkeypatch.setattr(reporting.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    return reporting.RichReporter(Console(file=out, force_terminal=False, width=200)), out


def test_without_a_terminal_progress_is_plain_lines_with_the_true_rate(monkeypatch):
    clock = [0.0]
    reporter, out = _plain_reporter(monkeypatch, clock)
    with reporter.task("encode-latents", total=20, unit="samples") as task:
        for _ in range(10):  # one sample every 50 s: a slow stage
            clock[0] += 50
            task.advance(1)
        task.advance(0, shards="1/2", milestone=True)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 10  # at least one line every 30 s, one per milestone, one at the end
    assert "10/20 samples" in lines[-1] and "0.02 samples/s" in lines[-1] and "ETA 0:08:20" in lines[-1]


def test_without_a_terminal_a_stage_prints_a_line_per_shard_and_only_rank_0_prints(tmp_path, monkeypatch):
    clock = [0.0]
    reporter, out = _plain_reporter(monkeypatch, clock)
    run_shard_jobs(_jobs(3), tmp_path / "out", _fn, reporter=reporter)
    shard_lines = [line for line in out.getvalue().splitlines() if "shards=" in line]
    assert [line.split("shards=")[1] for line in shard_lines] == ["1/3", "2/3", "3/3"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    reporter, out = _plain_reporter(monkeypatch, clock)
    assert run_shard_jobs(_jobs(3), tmp_path / "rank1", _fn, reporter=reporter).done == 1  # shard 000001 of 0 1 2
    reporter.log("a message")
    assert out.getvalue() == ""


# --------------------------------------------------------------------------- rotated videos


def _rotated_video(path: pathlib.Path, upright, tkhd_matrix) -> None:
    """Frames stored turned (as a phone stores a portrait video), with `tkhd_matrix` patched into the track header."""
    import struct

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=4)
        stream.width, stream.height, stream.pix_fmt = upright.shape[2], upright.shape[1], "yuvj420p"
        for i, image in enumerate(upright):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    matrix = at + 4 + (40 if data[at + 4] == 0 else 52)  # after version/flags, times, track id, duration, layer, volume
    data[matrix : matrix + 36] = struct.pack(">9i", *tkhd_matrix)
    path.write_bytes(bytes(data))


ONE, W = 1 << 16, 1 << 30  # 16.16 and 2.30 fixed point


@pytest.mark.parametrize(
    "matrix, turns",  # turns: counter-clockwise quarter turns that make the stored frames upright
    [
        ([0, ONE, 0, -ONE, 0, 0, 0, 0, W], 3),
        ([-ONE, 0, 0, 0, -ONE, 0, 0, 0, W], 2),
        ([0, -ONE, 0, ONE, 0, 0, 0, 0, W], 1),
    ],
)
def test_a_rotated_video_comes_out_upright_with_its_displayed_size(tmp_path, matrix, turns):
    import numpy as np

    import pipelines.data.video as video
    from pipelines.data.media import decode_clip
    from pipelines.prep.videos import video_clips

    upright = np.zeros((3, 48, 32, 3), np.uint8)  # 32 wide, 48 high, a white block top left
    upright[:, :16, :16] = 255
    _rotated_video(tmp_path / "phone.mp4", np.rot90(upright, k=-turns, axes=(1, 2)), matrix)
    messages = list(video_clips(tmp_path / "phone.mp4", video.ClipPlan(4.0, 2, 1), None, None, 32, False, 2))
    meta = messages[0][1]
    assert meta["source_size"] == [32, 48] and meta["size"] == [32, 48] and meta["source_rotation"] == 90 * turns
    _, clip_meta, clip = messages[1]
    assert clip_meta["decoder"] == "pyav"
    frames = decode_clip(clip)
    assert frames.shape == (2, 48, 32, 3)
    assert np.abs(frames.astype(int) - upright[:2]).mean() < 8  # JPEG twice: close, not exact
