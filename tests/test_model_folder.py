"""The exported model folder (pipelines/model_folder.py) as `train --init` and `gentron sample` meet it: a bad config,
one that is not JSON, and pickled weights are refused by name (exit 2, no traceback) and never run."""

from __future__ import annotations

import json
import pathlib

import pytest
from train_data import one_step_train_args
from typer.testing import CliRunner

from gentron_cli.main import app

runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no path folded mid-word in the CLI's messages


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
def test_a_bad_model_config_is_refused_by_name_when_loaded(tmp_path, tiny_run, name, edit, words):
    images, run = tiny_run
    folder = _model_variant(tmp_path, run, name, edit)
    args = one_step_train_args(images, tmp_path / "r", "--init", str(folder))
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert words in result.output and str(folder) in result.output


def test_a_model_config_that_is_not_json_ends_sample_with_exit_2(tmp_path, tiny_run):
    folder = _model_variant(tmp_path, tiny_run[1], "garbled")
    (folder / "config.json").write_text("{ depth: 2,")
    result = runner.invoke(
        app, ["sample", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "o")], env=WIDE
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot be read as JSON" in result.output and str(folder / "config.json") in result.output


def test_pickle_weights_are_refused_by_name_and_never_run(tmp_path, tiny_run):
    import pickle

    folder = _model_variant(tmp_path, tiny_run[1], "pickled")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    args = one_step_train_args(tiny_run[0], tmp_path / "r", "--init", str(folder))
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "diffusion_pytorch_model.bin" in result.output and "pickle" in result.output
    assert not marker.exists()
