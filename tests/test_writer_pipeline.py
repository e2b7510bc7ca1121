"""The streaming writer's pipeline: failures leave nothing, every write is checked, written bytes are verified."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightedit.edit.kernels as kernels
import weightedit.edit.rewrite as ortho
import weightedit.edit.spans as spans
import weightedit.edit.writer as writer
import weightedit.io.hashing as hashing
from weightedit.edit.direction_file import Direction, save_direction
from weightedit.edit.projection import (
    noise_floor,
    project_columns_,
    project_columns_streamed,
    project_out_,
    unit_direction,
)
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.errors import InvalidCheckpointError, WriteFailedError
from weightedit.io.checkpoint import read_header

from helpers import folder_hashes, load_tensors
from tiny_models import random_direction

SMALL_BLOCK = 4096  # bytes: splits every embedding into many row blocks, so the pipeline has many spans


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.weightedit-tmp-*"))
    assert not [t for t in threading.enumerate() if t.name == "weightedit-edit"], "the edit lane is still running"


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture()
def reference(tiny_checkpoints, tmp_path):
    """A sharded tiny llama and the bytes of its edit by the unpatched writer (large blocks)."""
    src = tiny_checkpoints("llama")
    report = orthogonalize_checkpoint(src, tmp_path / "reference", random_direction(), progress=False)
    return src, _shard_bytes(report.out)


def test_block_size_does_not_change_the_output(reference, tmp_path):
    src, expected = reference
    out = orthogonalize_checkpoint(src, tmp_path / "small", random_direction(), progress=False, block_bytes=SMALL_BLOCK)
    assert _shard_bytes(out.out) == expected


def test_short_writes_are_continued(reference, tmp_path, monkeypatch):
    src, expected = reference
    real = os.pwrite
    calls = []

    def short_write(fd, data, offset):
        calls.append(len(data))
        return real(fd, memoryview(data)[: max(1, len(data) // 3)], offset)

    monkeypatch.setattr(spans, "_os_pwrite", short_write)
    out = orthogonalize_checkpoint(src, tmp_path / "out", random_direction(), progress=False, block_bytes=SMALL_BLOCK)
    assert len(calls) > 20
    assert _shard_bytes(out.out) == expected


@pytest.mark.parametrize("fallback", ["sendfile", "pread"])
def test_copy_fallbacks_give_the_same_output(fallback, reference, tmp_path, monkeypatch):
    """Input and output on different filesystems: copy_file_range fails with EXDEV (and sendfile may not work)."""
    src, expected = reference

    def no_copy_file_range(*args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    def no_sendfile(*args):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(spans, "_os_copy_file_range", no_copy_file_range)
    if fallback == "pread":
        monkeypatch.setattr(spans, "_os_sendfile", no_sendfile)
    out = orthogonalize_checkpoint(src, tmp_path / "out", random_direction(), progress=False)
    assert _shard_bytes(out.out) == expected


@pytest.mark.parametrize("nth_data_write", [0, 1, 8])
def test_write_failure_in_the_pipeline_leaves_no_output(nth_data_write, tiny_checkpoints, tmp_path, monkeypatch):
    """The n-th write after the headers fails (the headers are written first, one per shard)."""
    src = tiny_checkpoints("llama")
    before = folder_hashes(src)
    failing_call = len(list(src.glob("*.safetensors"))) + nth_data_write
    real = os.pwrite
    calls = []
    lock = threading.Lock()

    def failing_write(fd, data, offset):
        with lock:  # both lanes write
            calls.append(1)
            fail = len(calls) == failing_call
        if fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(spans, "_os_pwrite", failing_write)
    out = tmp_path / "out"
    with pytest.raises(WriteFailedError, match="not enough disk space"):
        orthogonalize_checkpoint(src, out, random_direction(), progress=False, block_bytes=SMALL_BLOCK)
    assert len(calls) >= failing_call
    _no_leftovers(out)
    assert folder_hashes(src) == before


def test_failure_in_the_edit_lane_leaves_no_output(tiny_checkpoints, tmp_path, monkeypatch):
    src = tiny_checkpoints("llama")

    def broken_projection(*args, **kwargs):
        raise RuntimeError("injected failure in the edit lane")

    monkeypatch.setattr(writer, "project_rows", broken_projection)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        orthogonalize_checkpoint(src, out, random_direction(), progress=False, block_bytes=SMALL_BLOCK)
    _no_leftovers(out)


def test_write_that_makes_no_progress_is_a_full_disk(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(spans, "_os_pwrite", lambda fd, data, offset: 0)
    out = tmp_path / "out"
    with pytest.raises(WriteFailedError, match="not enough disk space"):
        orthogonalize_checkpoint(tiny_checkpoints("llama"), out, random_direction(), progress=False)
    _no_leftovers(out)


def _tiny_single_file(folder: Path) -> Path:
    """A one-file llama whose last tensor (the final norm) is copied unchanged."""
    folder.mkdir()
    d, vocab = 64, 256
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(vocab, d, generator=g),
            "lm_head.weight": torch.randn(vocab, d, generator=g),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(d, d, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(d, 128, generator=g),
            "model.norm.weight": torch.ones(4096),  # 16 KB, last in the file
        },
        str(folder / "model.safetensors"),
    )
    return folder


def test_disk_full_on_the_last_chunk_across_filesystems(tmp_path):
    """Input and output on different filesystems (no copy_file_range), the disk fills inside the last copy.

    A file-size limit just below the output shard's size makes the kernel accept only part of the last
    chunk, as a full disk does; the next write fails. That must read as a full disk, not as a truncated input.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp folder")
    src = _tiny_single_file(tmp_path / "model")
    header = read_header(src / "model.safetensors")
    last = max(header.tensors.values(), key=lambda t: t.start)
    assert last.name == "model.norm.weight"
    direction = save_direction(Direction(vector=torch.randn(64)), tmp_path / "r.safetensors")
    base = shm / f"weightedit-test-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        cli = [sys.executable, "-m", "weightedit.cli.main", "orthogonalize", "--model", str(src)]
        cli += ["--direction", str(direction), "--quiet"]
        ok = subprocess.run([*cli, "--out", str(base / "ok")], capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0, ok.stderr
        size = (base / "ok" / "model.safetensors").stat().st_size
        limit = size - 1000  # inside the final norm's 16 KB

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        out = base / "out"
        proc = subprocess.run(
            [*cli, "--out", str(out)], preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, proc.stderr
        assert "not enough disk space" in proc.stderr, proc.stderr
        assert "truncated" not in proc.stderr and "re-download" not in proc.stderr
        assert not out.exists() and not list(base.glob(".out.weightedit-tmp-*"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _corrupting_side_files(monkeypatch, pick):
    """After the shards are written (before verification), flip one byte of the tensor ``pick`` chooses."""
    real = ortho.copy_side_files

    def corrupt(src, tmp, **kwargs):
        for shard in sorted(tmp.glob("*.safetensors")):
            header = read_header(shard)
            info = pick(header)
            if info is not None:
                with open(shard, "r+b") as f:
                    f.seek(header.data_start + info.start)
                    byte = f.read(1)
                    f.seek(header.data_start + info.start)
                    f.write(bytes([byte[0] ^ 0x01]))
                break
        return real(src, tmp, **kwargs)

    monkeypatch.setattr(ortho, "copy_side_files", corrupt)


@pytest.mark.parametrize("which", ["edited", "copied"])
def test_verification_compares_written_bytes(which, tiny_checkpoints, tmp_path, monkeypatch):
    src = tiny_checkpoints("llama")

    def pick(header):
        for info in sorted(header.tensors.values(), key=lambda t: t.start):
            edited = info.name.endswith(("o_proj.weight", "down_proj.weight"))
            if info.nbytes and edited == (which == "edited"):
                return info
        return None

    _corrupting_side_files(monkeypatch, pick)
    out = tmp_path / "out"
    with pytest.raises(InvalidCheckpointError, match="verification failed: .* other bytes"):
        orthogonalize_checkpoint(src, out, random_direction(), progress=False)
    _no_leftovers(out)


def test_hashing_error_is_reported(tiny_checkpoints, tmp_path, monkeypatch):
    def unreadable(path, *, stop):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    src = tmp_path / "model"  # a new path: its hashes are not known yet
    shutil.copytree(tiny_checkpoints("llama"), src)
    monkeypatch.setattr(hashing, "sha256_file", unreadable)
    out = tmp_path / "out"
    with pytest.raises(InvalidCheckpointError, match="cannot read .* SHA-256"):
        orthogonalize_checkpoint(src, out, random_direction(), progress=False)
    _no_leftovers(out)


def test_input_hashes_are_reused_until_the_file_changes(tiny_checkpoints, tmp_path, monkeypatch):
    src = tmp_path / "model"
    shutil.copytree(tiny_checkpoints("llama", shards=False), src)
    real = hashing.sha256_file
    hashed = []

    def counting(path, *, stop):
        hashed.append(path.name)
        return real(path, stop=stop)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    first = orthogonalize_checkpoint(src, tmp_path / "a", random_direction(), progress=False)
    second = orthogonalize_checkpoint(src, tmp_path / "b", random_direction(), progress=False)
    assert hashed == ["model.safetensors"]
    assert first.provenance["input_shards"] == second.provenance["input_shards"]
    import hashlib

    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert second.provenance["input_shards"] == {"model.safetensors": digest}
    # A changed file (new mtime) is hashed again.
    st = (src / "model.safetensors").stat()
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    orthogonalize_checkpoint(src, tmp_path / "c", random_direction(), progress=False)
    assert hashed == ["model.safetensors", "model.safetensors"]


def test_every_output_file_and_the_parent_are_flushed(tiny_checkpoints, tmp_path, monkeypatch):
    """Every file of the output is fsynced before the rename, and the parent folder after it."""
    from weightedit.io import atomic

    real_fsync = os.fsync
    real_rename = atomic._rename_noreplace
    events: list[tuple[str, str]] = []

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def recording_rename(a, b):
        events.append(("rename", str(b)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    # The output is published by the atomic writer's no-replace rename (renameat2, or os.rename where absent).
    monkeypatch.setattr(atomic, "_rename_noreplace", recording_rename)
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = orthogonalize_checkpoint(tiny_checkpoints("llama"), parent / "out", random_direction(), progress=False).out
    renames = [i for i, (kind, path) in enumerate(events) if kind == "rename" and path == str(out)]
    assert len(renames) == 1
    before = {Path(p).name for kind, p in events[: renames[0]] if kind == "fsync"}
    after = [p for kind, p in events[renames[0] :] if kind == "fsync"]
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors.index.json", "weightedit.json"} <= files
    assert files <= before, files - before
    assert str(out.parent) in after


def test_streamed_columns_match_the_in_memory_edit_including_a_second_pass():
    """Columns almost parallel to u need a second update pass, which starts from the rows written first."""
    g = torch.Generator().manual_seed(0)
    d, m = 64, 32
    u = torch.randn(d, generator=g)
    u /= u.norm()
    matrix = (u[:, None] * 1e3 + torch.randn(d, m, generator=g) * 1e-3).contiguous()
    floor = noise_floor(torch.float32, d)
    src, dst = matrix.clone(), torch.full_like(matrix, float("nan"))
    passes: list[bool] = []

    def read(i0, i1, updated):
        passes.append(updated)
        return (dst if updated else src)[i0:i1].clone()  # a copy, as a read from a file is

    def write(i0, rows):
        dst[i0 : i0 + rows.shape[0]] = rows

    streamed = project_columns_streamed(d, m, torch.float32, u, floor, read=read, write=write, block_elems=256)
    in_memory = matrix.clone()
    reference = project_columns_(in_memory, u, floor, block_elems=256)
    assert True in passes, "the second pass did not run: the test lost its point"
    assert torch.equal(dst, in_memory)
    assert streamed == reference
    assert torch.equal(src, matrix)


def test_second_pass_in_the_writer_reads_back_what_it_wrote(tmp_path, monkeypatch):
    """End to end: writers almost parallel to the direction come out as the in-memory edit makes them."""
    real_read = spans.read_into
    read_from: list[str] = []

    def recording_read(fd, view, offset, path):
        read_from.append(path.parent.name)
        return real_read(fd, view, offset, path)

    monkeypatch.setattr(spans, "read_into", recording_read)
    src = tmp_path / "model"
    src.mkdir()
    d, ff, vocab = 64, 128, 256
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }
    (src / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(3)
    r = unit_direction(torch.randn(d, generator=g), d)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, d, generator=g),
        "lm_head.weight": torch.randn(vocab, d, generator=g),
        "model.layers.0.self_attn.o_proj.weight": r[:, None] * 1e3 + torch.randn(d, d, generator=g) * 1e-3,
        "model.layers.0.mlp.down_proj.weight": r[:, None] * 1e3 + torch.randn(d, ff, generator=g) * 1e-3,
        "model.norm.weight": torch.ones(d),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src / "model.safetensors"))
    report = orthogonalize_checkpoint(src, tmp_path / "out", r, progress=False)
    assert any(".weightedit-tmp-" in name for name in read_from), "no second pass read back the output"
    after = load_tensors(report.out)
    floor = noise_floor(torch.float32, d)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        expected = tensors[name].numpy().copy()  # the streaming edit's arithmetic, on the matrix held whole
        kernels.project_along(expected, "F32", r.numpy(), 0, floor)
        assert np.array_equal(after[name].numpy(), expected), name
        in_torch = tensors[name].clone().contiguous()  # and torch's in-memory edit, within rounding
        project_out_(in_torch, r, 0, floor=floor)
        # both cancel entries of ~1e3 down to ~1e-3: they may differ by a few float32 steps of the larger size
        scale = float(tensors[name].abs().max()) * torch.finfo(torch.float32).eps
        torch.testing.assert_close(after[name], in_torch, rtol=0, atol=16 * scale)


def test_output_that_comes_out_short_is_an_error(tmp_path, monkeypatch):
    """A filesystem that acknowledges bytes it does not store: the shard's size check catches it."""
    src = _tiny_single_file(tmp_path / "model")
    real = os.copy_file_range

    def lossy(src_fd, dst_fd, count, offset_src, offset_dst):
        real(src_fd, dst_fd, count - 1, offset_src, offset_dst)
        return count  # claims the last byte too

    monkeypatch.setattr(spans, "_os_copy_file_range", lossy)
    out = tmp_path / "out"
    with pytest.raises(WriteFailedError, match="produced .* bytes instead of .*: the output filesystem lost data"):
        orthogonalize_checkpoint(src, out, torch.randn(64), progress=False)
    _no_leftovers(out)


def test_input_that_shrinks_during_the_edit_is_reported(tmp_path, monkeypatch):
    src = _tiny_single_file(tmp_path / "model")
    real = ortho.shard_jobs

    def then_truncate(*args, **kwargs):
        jobs = real(*args, **kwargs)
        os.truncate(src / "model.safetensors", 4096)  # after the headers were read and checked
        return jobs

    monkeypatch.setattr(ortho, "shard_jobs", then_truncate)
    out = tmp_path / "out"
    with pytest.raises(InvalidCheckpointError, match="ended at byte .* the file changed or is truncated"):
        orthogonalize_checkpoint(src, out, torch.randn(64), progress=False)
    _no_leftovers(out)
