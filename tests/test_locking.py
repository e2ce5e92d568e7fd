"""One writer per folder (pipelines/locking.py)."""

from __future__ import annotations

import os

import pytest
from test_shards import _text_fn, _text_jobs

from pipelines.data.runner import run_shard_jobs
from pipelines.errors import GentronError

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
