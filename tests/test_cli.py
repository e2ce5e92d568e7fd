"""The command line as a whole: every command is there, start-up is light, the docs match the app."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from gentron_cli.main import app

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
