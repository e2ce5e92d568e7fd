"""The stage machinery every stage shares (pipelines/data/runner.py): the resume declarations, the options record,
the one tar scanner as both its readers see a damaged shard, and the stage commands' output folder option."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.loader import index_source
from pipelines.data.runner import ResumeOptions, check_output_options
from pipelines.data.shards import ShardWriter, iter_shard
from pipelines.encode import latents as encode_latents
from pipelines.encode import text as encode_text
from pipelines.errors import BadSample, GentronError
from pipelines.prep import images as prep_images
from pipelines.prep import videos as prep_videos

STAGES = [
    (prep_videos.PrepVideosConfig, prep_videos.RESUME),
    (prep_images.PrepImagesConfig, prep_images.RESUME),
    (encode_latents.EncodeLatentsConfig, encode_latents.RESUME),
    (encode_text.EncodeTextConfig, encode_text.RESUME),
]


@pytest.mark.parametrize("config_type, resume", STAGES, ids=[r.record_file for _, r in STAGES])
def test_every_option_of_every_stage_is_declared_once(config_type, resume):
    resume.check_complete(config_type)
    names = {f.name for f in fields(config_type)}
    assert set(resume.must_match) | set(resume.may_differ) == names
    assert not set(resume.must_match) & set(resume.may_differ)


def test_an_option_missing_from_the_declaration_fails():
    @dataclass
    class Config:
        input: str = "in"
        size: int = 8
        forgotten: int = 1  # a new option nobody declared

    resume = ResumeOptions("_x.json", must_match=("input", "size"), may_differ=())
    with pytest.raises(TypeError, match="forgotten"):
        resume.record(Config())

    @dataclass
    class WiderPrepImages(prep_images.PrepImagesConfig):
        forgotten: int = 0

    with pytest.raises(TypeError, match="forgotten"):
        WiderPrepImages("in", "out").output_options()


def test_the_options_record_refuses_a_resume_with_other_options(tmp_path):
    check_output_options(tmp_path / "out", {"size": 8}, "_x.json")
    check_output_options(tmp_path / "out", {"size": 8}, "_x.json")  # same options: resumes
    # nothing written yet (an earlier run stopped before its first shard): the new options are recorded
    check_output_options(tmp_path / "out", {"size": 16}, "_x.json")
    assert json.loads((tmp_path / "out" / "_x.json").read_text()) == {"size": 16}
    (tmp_path / "out" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(GentronError, match="different options .size."):
        check_output_options(tmp_path / "out", {"size": 8}, "_x.json")
    # prep-videos records the quantiser scale its quality maps to, where the quality would be: what decides the bytes
    record = prep_videos.PrepVideosConfig(tmp_path / "in", tmp_path / "v").output_options()
    assert "quality" not in record and record["qscale"] == 2
    assert list(record).index("qscale") == list(prep_videos.RESUME.must_match).index("quality")
    assert prep_videos.PrepVideosConfig(tmp_path / "in", tmp_path / "v", quality=99).output_options() == record
    assert prep_videos.PrepVideosConfig(tmp_path / "in", tmp_path / "v", quality=50).qscale == 17


def _shard(path, n=3):
    with ShardWriter(path) as writer:
        for i in range(n):
            writer.write(
                f"s{i}",
                {
                    schema.LATENT_MEAN: schema.encode_npy(np.full((3, 8, 8), i, np.float16)),
                    schema.LATENT_STD: schema.encode_npy(np.zeros((3, 8, 8), np.float16)),
                    schema.CAPTION: schema.encode_caption(f"caption {i}"),
                    schema.CLIP_TOKENS: schema.encode_npy(np.ones((2, 4), np.float16)),
                },
            )
    return path


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_a_truncated_shard_keeps_the_samples_before_the_cut_for_both_readers(tmp_path, cut):
    """One scanner (shards.scan_shard): the stages' reader and training's index agree on a cut tar."""
    folder = tmp_path / "data"
    folder.mkdir()
    path = _shard(folder / "000000.tar")
    data = path.read_bytes()
    # 4 members a sample; the cut: inside the third sample's first member, or where the third sample starts,
    # which leaves no end-of-archive marker: the second sample may have had more fields, so it is not kept
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar]
    end, kept = (offsets[8] + 512 + 100, ["s0", "s1"]) if cut == "mid_member" else (offsets[8], ["s0"])
    path.write_bytes(data[:end])
    read = []
    with pytest.raises(BadSample) as err:
        for key, _ in iter_shard(path):
            read.append(key)
    assert err.value.reason == "bad_shard" and "000000.tar" in err.value.detail
    source = index_source(folder, "image")
    assert [r.key for r in source.refs] == read == kept
    assert [f.reason for f in source.failures] == ["bad_shard"]


def _images(folder, n=2, side=40):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((side, side, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


class _NoResult:
    summary = {
        "shards": 0,
        "samples_in": 0,
        "samples_out": 0,
        "failed": 0,
        "seconds": 0.0,
        "failures_by_reason": {},
        "counters": {},
    }
    samples_in = samples_out = failed = skipped = done = 0
    seconds = items_per_second = 0.0


# the four stage commands, and the library function each one calls (replaced by one that records its config)
STAGE_COMMANDS = {
    "prep-videos": (prep_videos, "prep_videos"),
    "prep-images": (prep_images, "prep_images"),
    "encode-latents": (encode_latents, "encode_latents"),
    "encode-text": (encode_text, "encode_text"),
}


def _output_of(config):
    return config.output if hasattr(config, "output") else config.output_dir


@pytest.fixture
def stage_configs(monkeypatch):
    seen = []
    for module, function in STAGE_COMMANDS.values():
        monkeypatch.setattr(module, function, lambda config, reporter: seen.append(config) or _NoResult())
    return seen


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    result.text = " ".join(result.output.split())
    return result


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_stage_commands_take_their_output_folder_as_out(command, stage_configs, tmp_path):
    for flag in ("--out", "-o"):
        result = _invoke(command, tmp_path / "in", flag, tmp_path / flag)
        assert result.exit_code == 0, result.output
        assert Path(_output_of(stage_configs[-1])) == tmp_path / flag
    help_text = _invoke(command, "--help").text
    assert (
        "--out -o" in help_text and f"gentron {command} [OPTIONS] {{input}} " in help_text
    )  # no second argument shown


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_a_second_argument_or_no_out_is_refused_with_one_message(command, stage_configs, tmp_path):
    extra = _invoke(command, tmp_path / "in", tmp_path / "a", "--out", tmp_path / "b")
    assert extra.exit_code == 2 and "unexpected extra argument" in extra.text and "Traceback" not in extra.output
    neither = _invoke(command, tmp_path / "in")
    assert neither.exit_code == 2 and "Missing option '--out'" in neither.text and "Traceback" not in neither.output
    assert stage_configs == []  # nothing ran


@pytest.mark.parametrize("command", ["encode-latents", "encode-text"])
def test_encode_commands_take_rank_and_world_size_like_the_prep_commands(command, stage_configs, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert _invoke(command, tmp_path / "in", "-o", tmp_path / "out", "--rank", 1, "--world-size", 3).exit_code == 0
    assert (stage_configs[-1].rank, stage_configs[-1].world_size) == (1, 3)
    assert _invoke(command, tmp_path / "in", "-o", tmp_path / "out").exit_code == 0
    assert (stage_configs[-1].rank, stage_configs[-1].world_size) == (None, None)  # the stage reads the environment


def test_train_takes_its_run_folder_as_out_only(tmp_path, monkeypatch):
    """The pre-release spelling --output is gone: refused by the option parser, not silently mapped."""
    import pipelines.train.trainer

    seen = []
    monkeypatch.setattr(
        pipelines.train.trainer,
        "train",
        lambda cfg, reporter: seen.append(cfg) or (_ for _ in ()).throw(GentronError("stop here")),
    )
    result = CliRunner().invoke(app, ["train", "--output", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "No such option" in result.output and not seen
    CliRunner().invoke(app, ["train", "-o", str(tmp_path / "new")], env={"COLUMNS": "200"})
    assert seen[0].output == str(tmp_path / "new")
