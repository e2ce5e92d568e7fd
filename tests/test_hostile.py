"""Hostile inputs and faults of the CLI, training and model folders: each case gets one clear message, loses
nothing else, and no setting is silently ignored. Cheap by design: synthetic data, simulated faults
(monkeypatched OSErrors). The data stages' cases sit beside their own tests (test_shards, test_locking,
test_prep_images, test_prep_videos, test_encode)."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest
from test_shards import _text_fn, _text_jobs
from tiny import TINY_SPEC
from typer.testing import CliRunner

from gentron_cli.main import app
from gentron_cli.reporting import run_command
from pipelines.data.runner import run_shard_jobs
from pipelines.errors import GentronError
from pipelines.progress import NullReporter

runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no path folded mid-word in the CLI's messages


# --------------------------------------------------------------------------- storage faults


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
    run_shard_jobs(_text_jobs(3), tmp_path / "out", _text_fn, reporter=reporter)
    shard_lines = [line for line in out.getvalue().splitlines() if "shards=" in line]
    assert [line.split("shards=")[1] for line in shard_lines] == ["1/3", "2/3", "3/3"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    reporter, out = _plain_reporter(monkeypatch, clock)
    assert (
        run_shard_jobs(_text_jobs(3), tmp_path / "rank1", _text_fn, reporter=reporter).done == 1
    )  # shard 000001 of 0 1 2
    reporter.log("a message")
    assert out.getvalue() == ""
