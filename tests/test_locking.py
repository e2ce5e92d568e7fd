"""One writer per folder (pipelines/locking.py)."""

from __future__ import annotations

import os

import pytest
from test_shards import _text_fn, _text_jobs

from pipelines.data.runner import run_shard_jobs
from pipelines.data.shards import list_shards
from pipelines.errors import GentronError
from pipelines.files import atomic_write_bytes, temp_path
from pipelines.locking import folder_lock, lock_path

# --------------------------------------------------------------------------- two writers


def test_a_second_writer_into_an_output_folder_is_refused_naming_the_holder(tmp_path):
    from pipelines.locking import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(GentronError) as err:
            run_shard_jobs(_text_jobs(), out, _text_fn)
    assert (
        str(out) in err.value.message and f"process {os.getpid()}" in err.value.message and "since" in err.value.message
    )
    assert run_shard_jobs(_text_jobs(), out, _text_fn).done == 3  # released with its holder


@pytest.mark.parametrize("planted", ["symlink", "folder", "fifo"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_nothing_is_written_through_it(tmp_path, planted):
    out, victim = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    victim.write_text("precious")
    lock = lock_path(out)
    if planted == "symlink":  # planted in a shared folder: following it would truncate (as root: any file)
        lock.symlink_to(victim)
    elif planted == "folder":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    with pytest.raises(GentronError) as err:
        run_shard_jobs(_text_jobs(), out, _text_fn)
    assert str(lock) in err.value.message and "not a regular file" in err.value.message
    assert f"remove {lock}" in err.value.hint
    assert victim.read_text() == "precious" and not list_shards(out)


def test_a_planted_temporary_file_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    final = tmp_path / "out.json"
    temp_path(final).symlink_to(victim)  # the name this process would write the file under first
    atomic_write_bytes(final, b"new")
    assert victim.read_text() == "precious"
    assert final.read_bytes() == b"new" and not final.is_symlink() and not temp_path(final).exists()


def test_runs_of_different_world_sizes_never_write_one_folder_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):  # a world-size-1 run is writing
        with pytest.raises(GentronError) as err:
            run_shard_jobs(_text_jobs(), out, _text_fn, rank=0, world_size=2)
        assert f"process {os.getpid()}" in err.value.message and "world size 1" in err.value.message
        assert "--world-size" in err.value.hint
    with folder_lock(out, rank=1, world_size=2):  # rank 1 of a world-size-2 run is writing
        with pytest.raises(GentronError, match="world size 2"):
            run_shard_jobs(_text_jobs(), out, _text_fn)
        with pytest.raises(GentronError, match="world size 2"):
            run_shard_jobs(_text_jobs(), out, _text_fn, rank=0, world_size=3)
        assert run_shard_jobs(_text_jobs(), out, _text_fn, rank=0, world_size=2).done == 2  # its peer: shards 0, 2
    assert run_shard_jobs(_text_jobs(), out, _text_fn).done == 1  # alone again: the one shard left
