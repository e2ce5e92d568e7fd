"""Input discovery: folders with same-stem captions, manifests, keys, and user errors."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pipelines.data.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, discover_inputs
from pipelines.errors import BadSample, GentronError


def _touch(path, text=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    if text is not None:
        path.with_suffix(".txt").write_text(text, encoding="utf-8")


def test_folder_sorted_recursive_with_captions_and_unique_keys(tmp_path):
    _touch(tmp_path / "b.mp4", "bee")
    _touch(tmp_path / "a" / "clip.v1.MP4", "  first  \n")
    _touch(tmp_path / "a-clip.v1.mkv", "")  # same key as a/clip.v1 after make_key
    _touch(tmp_path / "notes.md")
    _touch(tmp_path / ".hidden.mp4")
    items = discover_inputs(tmp_path, VIDEO_EXTENSIONS)
    assert [i.source for i in items] == ["a-clip.v1.mkv", "a/clip.v1.MP4", "b.mp4"]
    assert [i.key for i in items] == ["a-clip-v1_000000", "a-clip-v1_000001", "b"]
    assert items[1].read_caption() == "first" and items[2].read_caption() == "bee"
    with pytest.raises(BadSample) as err:
        items[0].read_caption()
    assert err.value.reason == "missing_caption"
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(BadSample) as err:
        items[2].read_caption()
    assert err.value.reason == "caption_not_utf8"


def test_manifest_paths_relative_to_manifest_and_start_end(tmp_path):
    (tmp_path / "data").mkdir()
    pd.DataFrame(
        {
            "file": ["../v.mp4", "/abs/w.mp4", "../v.mp4"],
            "text": ["one", None, "three"],
            "start": [None, 1.5, 2],
            "end": [4, None, None],
        }
    ).to_parquet(tmp_path / "data" / "m.parquet")
    items = discover_inputs(
        tmp_path / "data" / "m.parquet", VIDEO_EXTENSIONS, path_column="file", caption_column="text"
    )
    assert [str(i.path) for i in items] == [
        str(tmp_path / "data" / "../v.mp4"),
        "/abs/w.mp4",
        str(tmp_path / "data" / "../v.mp4"),
    ]
    assert [(i.start, i.end) for i in items] == [(None, 4.0), (1.5, None), (2.0, None)]
    assert [i.key for i in items] == ["---v_000000", "abs-w", "---v_000002"]
    assert items[0].read_caption() == "one"
    with pytest.raises(BadSample):
        items[1].read_caption()


def test_user_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(GentronError, match="input not found: .*nope"):
        discover_inputs(tmp_path / "nope", VIDEO_EXTENSIONS)
    with pytest.raises(GentronError, match="no images found in") as err:
        discover_inputs(tmp_path, IMAGE_EXTENSIONS, what="images")
    assert ".png" in err.value.hint
    (tmp_path / "m.csv").write_text("video,caption\na.mp4,x\n")
    with pytest.raises(GentronError, match="no column 'path'") as err:
        discover_inputs(tmp_path / "m.csv", VIDEO_EXTENSIONS)
    assert "--path-column" in err.value.hint
    (tmp_path / "m2.csv").write_text("path,caption,start,end\na.mp4,x,5,2\n")
    with pytest.raises(GentronError, match="end .* is not after start"):
        discover_inputs(tmp_path / "m2.csv", VIDEO_EXTENSIONS)
    (tmp_path / "m3.csv").write_text("path,caption,start\na.mp4,x,soon\n")
    with pytest.raises(GentronError, match="row 0: start 'soon' is not a number"):
        discover_inputs(tmp_path / "m3.csv", VIDEO_EXTENSIONS)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(GentronError, match="neither a folder nor a manifest"):
        discover_inputs(tmp_path / "x.txt", VIDEO_EXTENSIONS)
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(GentronError, match="cannot read manifest .*bad.jsonl"):
        discover_inputs(tmp_path / "bad.jsonl", VIDEO_EXTENSIONS)


def test_odd_folder_entries_are_listed_for_prep_to_name_and_captions_read_as_text_files_are(tmp_path):
    _touch(tmp_path / "a.mp4", "line one\r\nline two\rthree")
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop2.mp4")  # a symlink loop: listing must not stop on it
    (tmp_path / "loop2.mp4").symlink_to(tmp_path / "loop.mp4")
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "folder.mp4").mkdir()  # a folder is not an item
    items = discover_inputs(tmp_path, VIDEO_EXTENSIONS)
    assert [i.source for i in items] == ["a.mp4", "fifo.mp4", "loop.mp4", "loop2.mp4"]
    assert items[0].read_caption() == "line one\nline two\nthree"  # universal newlines, as before
