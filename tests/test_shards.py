"""The shard contract: deterministic atomic writing, reading, stats, resume, rank and worker split."""

import contextlib
import errno
import hashlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from held import env_with_tests_on_path, wait_for
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.runner import ShardJob, resolve_rank, run_shard_jobs
from pipelines.data.shards import ShardWriter, iter_shard, list_shards, shard_name, verify_folder
from pipelines.errors import BadSample, GentronError
from pipelines.progress import NullReporter


def _samples(n, offset=0):
    for i in range(offset, offset + n):
        yield (
            schema.make_key("vid", i),
            {
                schema.CAPTION: schema.encode_caption(f"caption {i}"),
                schema.LATENT_MEAN: schema.encode_npy(np.full((2, 3), i, np.float16)),
                schema.META: schema.encode_json({"i": i, "b": [1, 2]}),
            },
        )


def _write(path, n):
    with ShardWriter(path) as w:
        for key, fields in _samples(n):
            w.write(key, fields)


def test_writer_is_deterministic_and_readable_by_webdataset(tmp_path):
    _write(tmp_path / "a.tar", 5)
    _write(tmp_path / "b.tar", 5)

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(tmp_path / "a.tar") == digest(tmp_path / "b.tar")
    ours = list(iter_shard(tmp_path / "a.tar"))
    theirs = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [k for k, _ in ours] == [s["__key__"] for s in theirs] == [f"vid_{i}" for i in range(5)]
    for (key, fields), s in zip(ours, theirs):
        assert fields[schema.LATENT_MEAN] == s[schema.LATENT_MEAN]
        assert schema.decode_npy(fields[schema.LATENT_MEAN])[0, 0] == int(key.split("_")[1])
        assert schema.decode_json(fields[schema.META])["i"] == int(key.split("_")[1])


def test_failed_writer_leaves_nothing_under_the_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x.tar") as w:
            w.write("k0", {"txt": b"a"})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_keys_with_dots_are_rejected_and_make_key_removes_them(tmp_path):
    with ShardWriter(tmp_path / "x.tar") as w:
        with pytest.raises(ValueError):
            w.write("a.b", {"txt": b"a"})
        w.write(schema.make_key("my.video", 3), {"txt": b"a"})
    assert [k for k, _ in iter_shard(tmp_path / "x.tar")] == ["my-video_3"]


def test_truncated_shard_yields_what_it_can_then_reports(tmp_path):
    _write(tmp_path / "a.tar", 6)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(BadSample) as err:
        for key, _ in iter_shard(tmp_path / "t.tar"):
            seen.append(key)
    assert err.value.reason == "bad_shard" and "t.tar" in err.value.detail
    assert 0 < len(seen) < 6


def test_caption_and_array_decoding_errors_are_bad_samples():
    with pytest.raises(BadSample) as e:
        schema.decode_caption(b"\xff\xfe bad")
    assert e.value.reason == "caption_not_utf8"
    with pytest.raises(BadSample):
        schema.decode_npy(b"not an array")


def _npy(array, version=None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_decode_npy_reads_what_np_load_reads(version):
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((77, 32)).astype(np.float16),
        np.asfortranarray(rng.standard_normal((3, 5))),
        rng.standard_normal((2, 3, 4)).astype(">f4"),
        np.array(3.5),
        np.zeros((0, 4), dtype=np.int64),
        np.array([True, False]),
        np.array([1 + 2j]),
    ]
    for array in arrays:
        data = _npy(array, version)
        decoded, expected = schema.decode_npy(data), np.load(io.BytesIO(data), allow_pickle=False)
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        np.testing.assert_array_equal(decoded, expected)
        assert decoded.flags.writeable and decoded.flags.c_contiguous == expected.flags.c_contiguous
        decoded[...] = 0  # its own memory, not the buffer's
        np.testing.assert_array_equal(schema.decode_npy(data), expected)


def test_damaged_or_pickled_arrays_are_bad_samples():
    data = _npy(np.arange(12, dtype=np.float32).reshape(3, 4))
    header_end = data.index(b"\n") + 1
    for damaged in (data[:-4], data[: header_end - 3], data[:9], _npy(np.array([{"a": 1}], dtype=object))):
        with pytest.raises(BadSample) as err:
            schema.decode_npy(damaged)
        assert err.value.reason == "bad_array"


def _job_fn(job, writer, stats, tick):
    for i in job.payload:
        stats.samples_in += 1
        if i % 4 == 3:
            stats.fail(f"item_{i}", BadSample("too_short", "test"))
        else:
            writer.write(f"item_{i}", {"txt": str(i).encode()})
        tick(1)


def _jobs(n_items=20, per_shard=5):
    items = list(range(n_items))
    return [ShardJob(shard_name(k), items[k * per_shard : (k + 1) * per_shard]) for k in range(n_items // per_shard)]


def test_stage_stats_summary_and_resume(tmp_path):
    out = tmp_path / "out"
    res = run_shard_jobs(_jobs(), out, _job_fn)
    assert res.done == 4 and res.samples_in == 20 and res.samples_out == 15 and res.failed == 5
    assert res.summary["failures_by_reason"] == {"too_short": 5}
    assert json.loads((out / "_summary.json").read_text())["samples_out"] == 15
    reference = {p.name: p.read_bytes() for p in list_shards(out)}
    # simulate a run killed after two shards: remove the rest, leave a stale temp file behind
    for name in ("000002", "000003"):
        (out / f"{name}.tar").unlink()
        (out / f"{name}.stats.json").unlink()
    (out / ".000002.tar.tmp-999").write_bytes(b"half")
    res2 = run_shard_jobs(_jobs(), out, _job_fn)
    assert (res2.done, res2.skipped) == (2, 2)
    assert {p.name: p.read_bytes() for p in list_shards(out)} == reference
    assert not list(out.glob(".*tmp*"))


def test_rank_split_covers_every_shard_once(tmp_path, monkeypatch):
    for r in range(3):
        run_shard_jobs(_jobs(40, 5), tmp_path, _job_fn, rank=r, world_size=3)
    assert [p.stem for p in list_shards(tmp_path)] == [shard_name(k) for k in range(8)]
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_rank() == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank() == (1, 2)  # torchrun's variables win over SLURM's
    with pytest.raises(GentronError):
        resolve_rank(3, 2)


def test_worker_pool_gives_the_same_shards_as_one_process(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_shard_jobs(_jobs(), a, _job_fn, workers=1)
    ticks = []

    class Task:
        def advance(self, n=1, **_):
            ticks.append(n)

    class Rep:
        from contextlib import contextmanager

        @contextmanager
        def task(self, *a, **k):
            yield Task()

        def log(self, m):
            pass

    run_shard_jobs(_jobs(), b, _job_fn, workers=2, reporter=Rep())
    assert sum(ticks) == 20
    assert [p.read_bytes() for p in list_shards(a)] == [p.read_bytes() for p in list_shards(b)]


def test_worker_threads_give_the_same_shards_largest_first_and_stop_on_an_error(tmp_path):
    import threading

    a, b = tmp_path / "a", tmp_path / "b"
    run_shard_jobs(_jobs(), a, _job_fn, workers=1)
    order = []

    def recording_fn(job, writer, stats, tick):
        order.append(job.name)
        _job_fn(job, writer, stats, tick)

    weighted = [ShardJob(j.name, j.payload, weight=w) for j, w in zip(_jobs(), [1, 5, 3, 5])]
    result = run_shard_jobs(weighted, b, recording_fn, workers=2, threads=True)
    assert result.done == 4 and result.samples_in == 20 and result.failed == 5
    assert [p.read_bytes() for p in list_shards(a)] == [p.read_bytes() for p in list_shards(b)]
    assert set(order[:2]) == {"000001", "000003"} and set(order[2:]) == {"000002", "000000"}  # the two heaviest first

    stopped = threading.Event()

    def failing_fn(job, writer, stats, tick):
        if job.name == "000001":
            raise OSError("disk on fire")
        stopped.wait(10)  # the other worker runs until the run stops it
        raise RuntimeError("stopped")

    with pytest.raises(OSError, match="disk on fire"):
        run_shard_jobs(_jobs(), tmp_path / "c", failing_fn, workers=2, threads=True, on_stop=stopped.set)
    assert stopped.is_set() and not list_shards(tmp_path / "c")  # on_stop was called; no shard was committed


def test_progress_total_counts_only_this_ranks_unfinished_items(tmp_path):
    totals = []

    class Rep:
        from contextlib import contextmanager

        @contextmanager
        def task(self, description, total, unit="it"):
            totals.append(total)

            class T:
                def advance(self, n=1, **_):
                    pass

            yield T()

        def log(self, m):
            pass

    jobs = [ShardJob(j.name, j.payload, items=len(j.payload)) for j in _jobs(40, 5)]  # 8 shards of 5
    run_shard_jobs(jobs[:3], tmp_path, _job_fn, reporter=Rep())  # three shards done earlier
    run_shard_jobs(jobs, tmp_path, _job_fn, rank=0, world_size=2, reporter=Rep())  # rank 0: shards 0 2 4 6, two left
    assert totals == [15, 10]
    run_shard_jobs(_jobs(40, 5), tmp_path / "unknown", _job_fn, reporter=Rep())  # jobs without counts
    assert totals[-1] is None


# --------------------------------------------------------------------------- hostile cases: damaged folders, faults


runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no path folded mid-word in the CLI's messages


def _text_fn(job, writer, stats, tick):
    for i in job.payload:
        stats.samples_in += 1
        writer.write(f"item_{i}", {"txt": f"caption {i}".encode() * 20})
        tick(1)


def _text_jobs(shards=3, per_shard=4):
    return [
        ShardJob(shard_name(k), list(range(k * per_shard, (k + 1) * per_shard)), items=per_shard) for k in range(shards)
    ]


class _Log(NullReporter):
    """A reporter that keeps the stage's messages."""

    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


# --------------------------------------------------------------------------- a damaged output folder


def test_rerun_redoes_a_missing_a_truncated_and_a_garbled_shard_byte_identically(tmp_path):
    out = tmp_path / "out"
    run_shard_jobs(_text_jobs(), out, _text_fn)
    reference = {p.name: p.read_bytes() for p in list_shards(out)}
    (out / "000000.tar").unlink()
    data = (out / "000001.tar").read_bytes()
    (out / "000001.tar").write_bytes(data[: len(data) // 2])
    (out / "000002.stats.json").write_text("{ not json")
    log = _Log()
    result = run_shard_jobs(_text_jobs(), out, _text_fn, reporter=log)
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

    out = tmp_path / "out"
    run_shard_jobs(_text_jobs(), out, _text_fn)
    reference = (out / "000001.tar").read_bytes()
    tampered = bytearray(reference)
    tampered[700] ^= 0xFF  # inside the first member's data: same size, other content
    (out / "000001.tar").write_bytes(bytes(tampered))

    result = runner.invoke(app, ["stats", str(out), "--verify"], env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "000001" in result.output and "sha256" in result.output
    assert [name for name, _ in verify_folder(out)] == ["000001"]

    assert run_shard_jobs(_text_jobs(), out, _text_fn).done == 0  # a plain rerun trusts the size
    assert run_shard_jobs(_text_jobs(), out, _text_fn, verify=True).done == 1
    assert (out / "000001.tar").read_bytes() == reference
    assert runner.invoke(app, ["stats", str(out), "--verify"], env=WIDE).exit_code == 0


def test_stats_of_a_folder_with_a_garbled_stats_file_names_it_instead_of_a_traceback(tmp_path):
    out = tmp_path / "out"
    run_shard_jobs(_text_jobs(), out, _text_fn)
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
        run_shard_jobs(_text_jobs(1), tmp_path / "out", fill_disk)
    assert "disk full while writing" in err.value.message and "000000.tar" in err.value.message
    assert (
        err.value.__context__ is None
        or not isinstance(err.value.__context__, OSError)
        or err.value.__suppress_context__
    )
    assert not list((tmp_path / "out").glob(".000000.tar.tmp-*"))


def tar_with_a_duplicate(path: pathlib.Path) -> None:
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

    tar_with_a_duplicate(tmp_path / "in.tar")
    found = []
    samples = list(iter_shard(tmp_path / "in.tar", on_skip=lambda key, bad: found.append((key, bad.reason))))
    assert [(k, f["txt"]) for k, f in samples] == [("a", b"first a"), ("b", b"b"), ("c", b"first c")]
    assert found == [("a", "duplicate_key"), ("c", "duplicate_key")]


def test_sigterm_stops_a_stage_with_worker_processes_keeping_finished_shards_with_exit_143(tmp_path):
    """What Slurm does before it kills a job: SIGTERM to every process of it. The worker processes ignore it; the
    stage stops as on Ctrl-C, keeps its finished shards, says so in one line and exits with 143."""
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    code = (
        "import functools\n"
        "from held import held_text_shard\n"
        "from gentron_cli.reporting import run_command\n"
        "from pipelines.data.runner import ShardJob, run_shard_jobs\n"
        "jobs = [ShardJob(f'{k:06d}', list(range(4 * k, 4 * k + 4))) for k in range(3)]\n"
        f"fn = functools.partial(held_text_shard, {str(markers)!r}, ('000002',))\n"
        f"run_command(lambda: run_shard_jobs(jobs, {str(out)!r}, fn, workers=2))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env_with_tests_on_path(),
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # shard 000002 is held; the other worker finishes 000000 and 000001
        wait_for(
            lambda: (
                (markers / "000002.started").exists()
                and len(list(out.glob("*.stats.json"))) == 2
                or proc.poll() is not None
            ),
            what="two finished shards",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "preempted: SIGTERM stopped shards" in stderr and "Traceback" not in stderr, stderr
    assert [p.name for p in list_shards(out)] == ["000000.tar", "000001.tar"]
    wait_for(lambda: not subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout, 60, "the end")
    assert run_shard_jobs(_text_jobs(), out, _text_fn).done == 1  # a rerun makes only the shard that was stopped


def _tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> pathlib.Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_keys_keep_their_folders_as_webdataset_defines_them(tmp_path):
    members = [("cats/0001.txt", b"a cat"), ("cats/0001.json", b"{}"), ("dogs/0001.txt", b"a dog")]
    members += [("./birds/a.b/0001.txt", b"a bird"), ("0001.txt", b"no folder")]
    path = _tar(tmp_path / "in.tar", members)
    theirs = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]
    ours = [key for key, _ in iter_shard(path)]
    assert ours == theirs == ["cats/0001", "dogs/0001", "./birds/a.b/0001", "0001"]  # none dropped as a duplicate
    with ShardWriter(tmp_path / "out.tar") as writer:  # and a stage writes them back as they were
        for key, fields in iter_shard(path):
            writer.write(key, fields)
    assert [key for key, _ in iter_shard(tmp_path / "out.tar")] == theirs


def test_a_key_that_would_unpack_outside_its_folder_is_skipped_and_named(tmp_path):
    path = _tar(tmp_path / "in.tar", [("../evil.txt", b"x"), ("/etc/evil.txt", b"x"), ("good.txt", b"y")])
    skipped = []
    kept = [key for key, _ in iter_shard(path, on_skip=lambda key, bad: skipped.append((key, bad.reason)))]
    assert kept == ["good"] and skipped == [("../evil", "bad_key"), ("/etc/evil", "bad_key")]
    for key in ("../evil", "/etc/evil", "a//b", "a/b.c", "a\\b"):
        with pytest.raises(ValueError, match="invalid sample key"), ShardWriter(tmp_path / "x.tar") as writer:
            writer.write(key, {"txt": b"x"})


def test_a_group_of_samples_that_fails_halfway_leaves_the_shard_as_if_never_started(tmp_path):
    samples = dict(_samples(4))
    keys = list(samples)
    with ShardWriter(tmp_path / "cut.tar") as writer:
        writer.write(keys[0], samples[keys[0]])
        with pytest.raises(BadSample), writer.all_or_none():  # written as made, then the source fails
            writer.write(keys[1], samples[keys[1]] | {"big.bin": bytes(50_000)})
            writer.write(keys[2], samples[keys[2]])
            raise BadSample("corrupt", "the third clip of a video")
        writer.write(keys[3], samples[keys[3]])
        with writer.all_or_none():
            writer.write(keys[1], samples[keys[1]])  # its key is free again
    with ShardWriter(tmp_path / "plain.tar") as plain:
        for key in (keys[0], keys[3], keys[1]):
            plain.write(key, samples[key])
    data = (tmp_path / "cut.tar").read_bytes()
    assert data == (tmp_path / "plain.tar").read_bytes()
    assert (writer.size, writer.sha256) == (len(data), hashlib.sha256(data).hexdigest())  # what the stats record
