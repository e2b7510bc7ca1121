"""The streaming edit of a direction file: no torch, the same checkpoint as before, nothing left on a failure.

Given a direction *file*, the rewrite checks the file's metadata and reads its vector with NumPy, creates the
output shards and starts a lane on the untouched bytes while the writers' targets are computed; both lanes then
edit. These tests pin down that this changes nothing a user sees: same bytes, same refusals of bad directions
before anything is written, nothing left behind on a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from weightedit.edit.direction_file import Direction, load_direction, peek_direction, save_direction
from weightedit.edit.projection import noise_floor
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.edit.spans import NOISE_FACTOR, noise_floor_for
from weightedit.errors import FilterFailedDirectionError, InvalidDirectionError
from weightedit.io.checkpoint import read_header

from tiny_models import random_direction


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.weightedit-tmp-*"))
    assert not [t for t in threading.enumerate() if t.name == "weightedit-edit"], "the copy lane is still running"


def test_a_direction_file_gives_the_same_checkpoint_as_the_loaded_direction(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama")
    path = save_direction(Direction(vector=random_direction(), layer=1, position=-1), tmp_path / "r.safetensors")
    from_file = orthogonalize_checkpoint(src, tmp_path / "file", path, progress=False)
    loaded = load_direction(path)
    from_object = orthogonalize_checkpoint(src, tmp_path / "object", loaded, progress=False)
    assert _shards(from_file.out) == _shards(from_object.out)
    assert from_file.tensors_edited == from_object.tensors_edited > 0
    # The headers carry the hash of the vector the edit used.
    for shard in from_file.out.glob("*.safetensors"):
        assert read_header(shard).metadata["weightedit_direction_sha256"] == loaded.sha256()
    provenance = json.loads((from_file.out / "weightedit.json").read_text())
    assert provenance["direction"]["file"] == "r.safetensors"


@pytest.mark.parametrize("entry", ["library", "command"])
def test_a_direction_file_is_edited_without_torch(tiny_checkpoints, tmp_path, entry):
    """In a fresh interpreter, both from the library call and from `weightedit orthogonalize --direction FILE`:
    the whole edit (plan, copy, the vector, the projection, verification, provenance) never imports torch."""
    src = tiny_checkpoints("llama")
    path = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
    out_dir = tmp_path / "out"
    if entry == "library":
        run = (
            "from weightedit.edit.rewrite import orthogonalize_checkpoint\n"
            f"report = orthogonalize_checkpoint({str(src)!r}, {str(out_dir)!r}, {str(path)!r}, progress=False)\n"
            "edited = report.tensors_edited"
        )
    else:
        argv = ["weightedit", "orthogonalize", "--model", str(src), "--direction", str(path), "--out", str(out_dir)]
        run = (
            f"sys.argv = {argv!r}\nfrom weightedit.cli.main import app\n"
            "try:\n    app(sys.argv[1:] + ['--quiet'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            f"edited = json.load(open({str(out_dir / 'weightedit.json')!r}))['verification']['writers_edited']"
        )
    code = f"""
import importlib.abc, json, sys, threading
seen = {{}}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = [t.name for t in threading.enumerate()]
        return None
sys.meta_path.insert(0, Watch())
{run}
print(json.dumps({{"torch": seen.get("torch"), "edited": edited}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is None, f"torch was imported (threads then: {result['torch']})"
    assert result["edited"] > 0


def test_a_direction_that_failed_its_filter_is_refused_and_nothing_is_left(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama")
    failed = Direction(vector=random_direction(), meta={"selection": {"kl_filter_passed": False, "kl": 0.9}})
    path = save_direction(failed, tmp_path / "failed.safetensors")
    assert peek_direction(path) is not None  # refused from its metadata, before the copy starts
    out = tmp_path / "out"
    with pytest.raises(FilterFailedDirectionError):
        orthogonalize_checkpoint(src, out, path, progress=False)
    _no_leftovers(out)


def test_a_wrong_width_is_refused_from_the_metadata(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama")
    path = save_direction(Direction(vector=random_direction(d=7)), tmp_path / "narrow.safetensors")
    out = tmp_path / "out"
    with pytest.raises(InvalidDirectionError, match="d_model=7"):
        orthogonalize_checkpoint(src, out, path, progress=False)
    _no_leftovers(out)


def test_a_vector_that_fails_its_checks_leaves_nothing(tiny_checkpoints, tmp_path):
    """Metadata fine, vector all zeros: found when the vector is read, before anything is written."""
    src = tiny_checkpoints("llama")
    from safetensors.torch import save_file

    path = tmp_path / "zero.safetensors"
    save_file({"direction": torch.zeros(random_direction().numel())}, str(path))
    assert peek_direction(path) is not None
    out = tmp_path / "out"
    with pytest.raises(InvalidDirectionError, match="zero norm"):
        orthogonalize_checkpoint(src, out, path, progress=False)
    _no_leftovers(out)


@pytest.mark.parametrize("name", ["r.npy", "r.pt"])
def test_other_direction_formats_are_loaded_first(tiny_checkpoints, tmp_path, name):
    src = tiny_checkpoints("llama")
    r = random_direction()
    path = tmp_path / name
    if name.endswith(".npy"):
        import numpy as np

        np.save(path, r.numpy())
    else:
        torch.save(r, path)
    assert peek_direction(path) is None
    report = orthogonalize_checkpoint(src, tmp_path / "out", path, progress=False)
    reference = orthogonalize_checkpoint(src, tmp_path / "ref", r, progress=False)
    assert _shards(report.out) == _shards(reference.out)


def test_the_planner_floor_is_the_projection_floor():
    for code, dtype in (
        ("F64", torch.float64),
        ("F32", torch.float32),
        ("F16", torch.float16),
        ("BF16", torch.bfloat16),
    ):
        for d in (7, 64, 4096):
            assert noise_floor_for(code, d) == noise_floor(dtype, d)
    assert NOISE_FACTOR == 8.0


# ----------------------------------------------------------------------------------------------------------
# Ordering: what is checked before the copy starts, and the Pipeline's own guarantees
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_copy(monkeypatch):
    """Make starting the copy an error: a refusal that comes from the metadata must come before it."""
    import weightedit.edit.spans as spans

    def refuse(self):
        raise AssertionError("the copy started before the direction was refused")

    monkeypatch.setattr(spans.Pipeline, "start", refuse)


def test_metadata_refusals_come_before_the_copy(tiny_checkpoints, tmp_path, no_copy):
    src = tiny_checkpoints("llama")
    failed = Direction(vector=random_direction(), meta={"selection": {"kl_filter_passed": False, "kl": 0.9}})
    with pytest.raises(FilterFailedDirectionError):
        orthogonalize_checkpoint(
            src, tmp_path / "a", save_direction(failed, tmp_path / "f.safetensors"), progress=False
        )
    narrow = save_direction(Direction(vector=random_direction(d=7)), tmp_path / "n.safetensors")
    with pytest.raises(InvalidDirectionError, match="d_model=7"):
        orthogonalize_checkpoint(src, tmp_path / "b", narrow, progress=False)
    with pytest.raises(InvalidDirectionError, match="zero norm"):  # a tensor in hand is checked whole, first
        orthogonalize_checkpoint(src, tmp_path / "c", torch.zeros(random_direction().numel()), progress=False)
    _no_leftovers(tmp_path / "a")


def test_a_bad_direction_file_is_reported_before_the_model_is_resolved(tmp_path, monkeypatch):
    import weightedit.edit.rewrite as rewrite

    def no_download(*args, **kwargs):
        raise AssertionError("the model was resolved (downloaded, converted) before the direction was checked")

    monkeypatch.setattr(rewrite, "resolve_model", no_download)
    with pytest.raises(InvalidDirectionError, match="does not exist"):
        rewrite.orthogonalize("org/some-model", tmp_path / "out", tmp_path / "missing.safetensors", progress=False)


def test_a_copy_lane_failure_is_what_the_user_sees(tiny_checkpoints, tmp_path, monkeypatch):
    """A disk error in the copy lane wins over a failure the calling thread meets after it (here while it
    computes the writers' targets)."""
    import errno
    import time

    import weightedit.edit.rewrite as rewrite
    import weightedit.edit.spans as spans

    def eio(*args):
        raise OSError(errno.EIO, "injected I/O error")

    def later(*args):
        time.sleep(0.5)  # the copy lane has failed by then
        raise RuntimeError("a consequence")

    monkeypatch.setattr(spans, "_os_copy_file_range", eio)
    monkeypatch.setattr(rewrite, "writer_targets", later)
    path = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected I/O error"):
        orthogonalize_checkpoint(tiny_checkpoints("llama"), out, path, progress=False)
    _no_leftovers(out)


def _pipeline_jobs(tmp_path: Path, n: int = 3):
    from weightedit.edit.spans import CopySpan, EditSpan, ShardJob

    jobs = []
    for i in range(n):
        src = tmp_path / f"in{i}"
        src.write_bytes(bytes(range(256)) * 64)
        spans = [
            CopySpan(0, 4096),
            EditSpan(f"t{i}", 4096, 4096, "F32", (32, 32), 0, 0.0, "whole"),
            CopySpan(8192, 8192),
        ]
        jobs.append(ShardJob(src=src, dest=tmp_path / f"out{i}", header=b"H" * 8, spans=spans))
    return jobs


class _FakeEditor:
    """Writes the span's input bytes reversed (so the output shows who wrote it)."""

    def __call__(self, src_fd, dst_fd, pos, job, span, samples):
        data = os.pread(src_fd, span.length, span.offset)[::-1]
        os.pwrite(dst_fd, data, pos)
        return _Stats()


class _Stats:
    def merge(self, other):
        pass


def test_each_shard_is_reported_once_and_only_when_its_last_span_is_written(tmp_path):
    from weightedit.edit.spans import Pipeline

    jobs = _pipeline_jobs(tmp_path)
    seen: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def written(path):
        with lock:
            seen.append((path.name, path.read_bytes()[:8]))

    pipeline = Pipeline(jobs, on_shard_written=written).start()
    # Let the first lane finish every copy before there is an editor: the shards complete from finish().
    deadline = 200
    while deadline and any(job.dest.stat().st_size < job.size for job in jobs):
        threading.Event().wait(0.01)
        deadline -= 1
    assert seen == []  # no shard is complete while its edit span is still to do
    pipeline.finish(lambda: _FakeEditor())
    assert sorted(name for name, _ in seen) == [job.dest.name for job in jobs]
    assert all(head == b"H" * 8 for _, head in seen)
    for job in jobs:
        data = job.dest.read_bytes()
        src = job.src.read_bytes()
        assert data == b"H" * 8 + src[:4096] + src[4096:8192][::-1] + src[8192:16384]
    assert not [t for t in threading.enumerate() if t.name == "weightedit-edit"]


def test_finish_raises_what_stopped_the_first_lane(tmp_path, monkeypatch):
    import errno

    import weightedit.edit.spans as spans

    def enospc(*args):
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(spans, "_os_copy_file_range", enospc)
    pipeline = spans.Pipeline(_pipeline_jobs(tmp_path)).start()
    while pipeline.failure is None and [t for t in threading.enumerate() if t.name == "weightedit-edit"]:
        threading.Event().wait(0.01)
    with pytest.raises(OSError, match="no space"):
        pipeline.finish(lambda: _FakeEditor())
    assert not [t for t in threading.enumerate() if t.name == "weightedit-edit"]


def test_an_editor_that_cannot_be_made_stops_both_lanes(tmp_path):
    from weightedit.edit.spans import Pipeline

    def broken():
        raise RuntimeError("no editor")

    pipeline = Pipeline(_pipeline_jobs(tmp_path)).start()
    with pytest.raises(RuntimeError, match="no editor"):
        pipeline.finish(broken)
    assert not [t for t in threading.enumerate() if t.name == "weightedit-edit"]


def test_a_disk_that_cannot_hold_a_shard_says_so_before_any_data(tiny_checkpoints, tmp_path, monkeypatch):
    """The blocks of each shard are reserved when it is created: a full disk fails there, nothing is left."""
    import ctypes
    import errno

    import weightedit.edit.spans as spans
    from weightedit.errors import WriteFailedError

    copies = []

    def full(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    def no_copy(*args):
        copies.append(args)
        raise AssertionError("data was copied into a shard the disk cannot hold")

    monkeypatch.setattr(spans, "_fallocate", full)
    monkeypatch.setattr(spans, "_os_copy_file_range", no_copy)
    out = tmp_path / "out"
    with pytest.raises(WriteFailedError, match="not enough disk space"):
        orthogonalize_checkpoint(tiny_checkpoints("llama"), out, random_direction(), progress=False)
    assert copies == []
    _no_leftovers(out)


def test_reserving_keeps_the_size_and_a_filesystem_without_it_still_works(tmp_path, monkeypatch):
    import weightedit.edit.spans as spans

    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        spans.reserve(fd, 1 << 20)
        assert os.fstat(fd).st_size == 0  # the size check of a finished shard still sees only what was written
        monkeypatch.setattr(spans, "_fallocate", lambda *a: (ctypes_errno(95), -1)[1])  # EOPNOTSUPP: ignored
        spans.reserve(fd, 1 << 20)
    finally:
        os.close(fd)


def ctypes_errno(code: int) -> None:
    import ctypes

    ctypes.set_errno(code)


def test_a_writer_with_nan_values_fails_verification_and_leaves_nothing(tiny_checkpoints, tmp_path):
    """NaN in a writer makes its statistics NaN: verification must refuse it, not pass it as already orthogonal."""
    import shutil

    from safetensors.torch import save_file

    from weightedit.errors import InvalidCheckpointError

    from helpers import load_tensors

    src = tmp_path / "nan-model"
    shutil.copytree(tiny_checkpoints("llama"), src)
    tensors = load_tensors(src)
    name = next(n for n in tensors if n.endswith("o_proj.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src / "model.safetensors"))
    path = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
    out = tmp_path / "out"
    with pytest.raises(InvalidCheckpointError, match=f"{name} holds NaN or infinite values"):
        orthogonalize_checkpoint(src, out, path, progress=False)
    _no_leftovers(out)


def test_a_direction_file_cut_short_is_one_clear_error(tiny_checkpoints, tmp_path):
    path = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the header intact, the vector's last bytes gone
    out = tmp_path / "out"
    with pytest.raises(InvalidDirectionError, match="not a complete safetensors file .* save the direction again"):
        orthogonalize_checkpoint(tiny_checkpoints("llama"), out, path, progress=False)
    _no_leftovers(out)


def test_a_shard_with_nothing_but_its_header_is_complete_from_the_start(tmp_path):
    from weightedit.edit.spans import Pipeline, ShardJob

    seen = []
    job = ShardJob(src=tmp_path / "unused", dest=tmp_path / "empty", header=b"H" * 8, spans=[])
    pipeline = Pipeline([job], on_shard_written=seen.append).start()
    assert seen == [job.dest]
    pipeline.finish(lambda: _FakeEditor())
    assert seen == [job.dest]
    assert job.dest.read_bytes() == b"H" * 8
