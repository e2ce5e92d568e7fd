"""The quickstart's stages end to end at a small size, through the CLI (the full run is not a test)."""

import json
import re
from urllib.parse import unquote

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data.shards import summarize
from pipelines.evaluate.probe import clip_step, probe_given_video, probe_image, probe_video
from pipelines.sample.outputs import read_frame_strip


def test_quickstart_smoke_runs_every_stage_and_scores_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder relative to the working one, as the default `gentron-quickstart` is
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--smoke", "--out", "qs"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "total time" in result.output

    # every stage wrote its output: 16 images and 16 videos (one clip each) made it through prep and encoding
    for kind, n in (("images", 16), ("videos", 16)):
        for stage in ("prep", "latents"):
            assert summarize(out / f"data/{kind}-{stage}")["samples_out"] == n
        assert summarize(out / f"data/{kind}")["samples_out"] == n
        assert (out / f"data/{kind}/empty_caption.npz").is_file()
    for run in ("t2i", "t2v", "i2v"):
        assert (out / f"runs/{run}/model/config.json").is_file() and (out / f"runs/{run}/loss.png").is_file()
    assert json.loads((out / "runs/t2v/model/config.json").read_text())["temporal"] is True
    assert json.loads((out / "runs/i2v/model/config.json").read_text())["frame_conditioning"] is True
    for run in ("t2i", "t2v", "i2v"):  # every stage trains with the small-data recipe (objective, timesteps, shift)
        settings = json.loads((out / f"runs/{run}/config.json").read_text())
        assert settings["recipe"] == "small-data" and settings["objective"] == "flow", settings
        assert (settings["timestep_sampling"], settings["noise_shift"]) == ("logit-normal", "auto")

    # the report's figures are the probe's verdicts on the files it points to
    report = (out / "index.html").read_text()
    hits = {"color": 0, "place": 0}
    pngs = sorted(p for p in (out / "samples/t2i").glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 16
    for png in pngs:
        prompt = json.loads(png.with_suffix(".json").read_text())["prompt"]
        for k, ok in probe_image(np.asarray(Image.open(png).convert("RGB")), prompt).items():
            hits[k] += ok
    assert f"({hits['color']}/16;" in report and f"({hits['place']}/16;" in report
    strips = sorted((out / "samples/t2v-mfg").glob("0*.frames.png"))
    assert len(strips) == 16
    video_hits = {"color": 0, "direction": 0, "axis": 0}
    for strip in strips:
        prompt = json.loads(strip.with_name(strip.name.replace(".frames.png", ".json")).read_text())["prompt"]
        frames = read_frame_strip(strip, 4)
        assert frames.shape == (4, 16, 16, 3)
        for k, ok in probe_video(frames, prompt).items():
            video_hits[k] += ok
    mfg_row = next(r for r in report.split("<tr>") if r.startswith("<td>T2V videos, motion-free guidance"))
    assert all(f"({video_hits[k]}/16;" in mfg_row for k in video_hits), (mfg_row, video_hits)
    assert video_hits["axis"] >= video_hits["direction"]  # the right direction is on the right axis
    # the image-to-video row: each video starts with the first frame it was given, and the row counts what the
    # probe reads on its files
    i2v_hits = {"color": 0, "direction": 0, "axis": 0, "start": 0}
    strips = sorted((out / "samples/i2v").glob("0*.frames.png"))
    assert len(strips) == 16
    for strip in strips:
        record = json.loads(strip.with_name(strip.name.replace(".frames.png", ".json")).read_text())
        frames = read_frame_strip(strip, 4)
        given = np.asarray(Image.open(out / "samples/i2v" / record["given"]["file"]).convert("RGB"))
        np.testing.assert_array_equal(frames[0], given)
        step = clip_step(0.375, 15, 48)  # the smoke quickstart's squares, every 15th of 2 s at 24 FPS
        for k, ok in probe_given_video(frames, record["prompt"], 1, step).items():
            i2v_hits[k] += ok
    i2v_row = next(r for r in report.split("<tr>") if r.startswith("<td>Image-to-video, given the first frame"))
    assert all(f"({i2v_hits[k]}/16" in i2v_row for k in i2v_hits), (i2v_row, i2v_hits)
    # every picture and link of the page exists, the runs' own pages included
    targets = re.findall(r'(?:src|href)="([^"]+)"', report)
    for target in targets:
        assert (out / unquote(target)).exists(), target
    assert "samples/t2v-mfg/grid.frames.png" in targets and "runs/t2v/index.html" in targets
    assert "samples/i2v/grid.frames.png" in targets and "runs/i2v/index.html" in targets


def test_quickstart_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "precious.txt").write_text("user data")
    result = CliRunner().invoke(app, ["quickstart", "--smoke", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not a quickstart folder" in result.output
    assert (tmp_path / "precious.txt").read_text() == "user data"
