"""The command line as a whole: every command is there, start-up is light, the docs match the app; storage faults are
one message naming the path; progress without a terminal is plain periodic lines."""

import errno
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
from test_shards import _text_fn, _text_jobs
from typer.testing import CliRunner

from gentron_cli.main import app
from gentron_cli.reporting import run_command
from pipelines.data.runner import run_shard_jobs

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "quickstart",
    "prep-videos",
    "prep-images",
    "encode-latents",
    "encode-text",
    "train",
    "sample",
    "info",
    "stats",
]


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.output, name


def test_cli_start_up_imports_no_deep_learning_library():
    # `gentron --help` and spawned worker processes import the app; the library loads inside commands.
    code = (
        "import sys, gentron_cli.main; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_cli_reference_is_generated_from_the_app(tmp_path):
    generated = tmp_path / "cli.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "typer",
            "gentron_cli.main",
            "utils",
            "docs",
            "--name",
            "gentron",
            "--output",
            str(generated),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    assert generated.read_text() == (ROOT / "docs/cli.md").read_text(), (
        "docs/cli.md is out of date: python -m typer gentron_cli.main utils docs --name gentron --output docs/cli.md"
    )


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci/run").read_text()
    test_command = readme[readme.index("# 2. Run the tests (in the same environment):") + 1]
    assert test_command in ci.splitlines()
    install = next(line for line in readme if "pip install torch==2.13.0" in line)
    assert "torch==2.13.0" in ci and "-c constraints.txt" in install and "-c constraints.txt" in ci


def test_user_errors_exit_2_with_a_message_and_no_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(app, ["stats", str(missing)], env={"COLUMNS": "1000"})  # no path folded mid-word
    assert result.exit_code == 2
    assert str(missing) in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- storage faults, messages, progress


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
