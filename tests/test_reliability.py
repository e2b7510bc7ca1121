"""No data loss, no debris, no tracebacks: the write path under failures, signals and hostile inputs.

Each test drives the real CLI (typer's runner in-process, or a subprocess where signals are sent) and
checks what is on disk afterwards: the input untouched, the previous output intact, no hidden temporaries.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_bad_inputs import _big_checkpoint, _cli
from typer.testing import CliRunner

import weightedit.io.atomic as atomic
from weightedit.cli.main import app
from weightedit.edit.direction_file import Direction, save_direction
from weightedit.io.atomic import TMP_MARKER

from helpers import folder_hashes
from tiny_models import make_planted_model, random_direction, write_planted_prompts


def invoke(*args: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def debris(folder: Path) -> list[str]:
    """Hidden temporaries weightedit leaves next to its outputs (there must never be any)."""
    return sorted(p.name for p in folder.iterdir() if ".weightedit-" in p.name)


@pytest.fixture()
def model(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoints("llama"), folder)
    return folder


@pytest.fixture()
def direction_file(tmp_path) -> Path:
    return save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")


@pytest.fixture()
def previous(model, direction_file, tmp_path) -> tuple[Path, dict[str, str]]:
    """An existing, complete output folder (from an earlier edit) and its file hashes."""
    out = tmp_path / "out"
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", out, "--quiet")
    assert code == 0, output
    return out, folder_hashes(out)


def other_direction(tmp_path: Path) -> Path:
    return save_direction(Direction(vector=random_direction(seed=7)), tmp_path / "r2.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Data loss
# ----------------------------------------------------------------------------------------------------------


def _fail_when_renaming_into(monkeypatch: pytest.MonkeyPatch, out: Path, *, exchange: bool) -> None:
    """Make the rename that puts the new output at ``out`` fail (EIO), whatever call the code uses for it."""
    real_rename, real_replace, real_rename2 = os.rename, os.replace, atomic._rename2

    def guarded(real):
        def call(src, dst, *args, **kwargs):
            if TMP_MARKER in Path(src).name and Path(dst) == out:
                raise OSError(errno.EIO, "Input/output error", str(dst))
            return real(src, dst, *args, **kwargs)

        return call

    def rename2(src, dst, flags):
        if not exchange and flags == atomic._RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "not supported here")
        return guarded(real_rename2)(src, dst, flags)

    monkeypatch.setattr(os, "rename", guarded(real_rename))
    monkeypatch.setattr(os, "replace", guarded(real_replace))
    monkeypatch.setattr(atomic, "_rename2", rename2, raising=False)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_failed_overwrite_swap_keeps_the_previous_output(previous, model, tmp_path, monkeypatch, exchange):
    out, before = previous
    _fail_when_renaming_into(monkeypatch, out, exchange=exchange)
    code, output = invoke(
        "orthogonalize", "--model", model, "--direction", other_direction(tmp_path), "--out", out, "--overwrite"
    )
    assert code == 2, output
    assert "Traceback" not in output and output.count("error:") == 1
    assert folder_hashes(out) == before  # the previous output is back at its path, byte for byte
    assert debris(tmp_path) == []


def test_signal_between_the_two_renames_is_held_back(previous, model, tmp_path, monkeypatch):
    """Ctrl-C right after the previous output was moved aside: the swap still completes, nothing is lost."""
    out, before = previous
    real_rename = os.rename
    real_replace = os.replace

    def interrupt_after(real):
        def call(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            if Path(src) == out:  # the previous output has just been moved aside
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the signal is handled here, between the two renames
            return result

        return call

    monkeypatch.setattr(os, "rename", interrupt_after(real_rename))
    monkeypatch.setattr(os, "replace", interrupt_after(real_replace))
    monkeypatch.setattr(
        atomic, "_rename2", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no renameat2")), raising=False
    )
    code, output = invoke(
        "orthogonalize", "--model", model, "--direction", other_direction(tmp_path), "--out", out, "--overwrite"
    )
    assert code == 130, output
    assert out.is_dir() and (out / "weightedit.json").is_file()
    assert folder_hashes(out) != before  # the new output is complete and in place
    assert "already complete and kept" in output and str(out) in output
    assert debris(tmp_path) == []


def test_out_holding_the_inputs_symlinked_shards_is_refused(model, direction_file, tmp_path):
    """The input's shards are links into --out (HF cache blobs, git-annex, DVC): --overwrite must not delete them."""
    store = tmp_path / "store"
    store.mkdir()
    for shard in sorted(model.glob("*.safetensors")):
        shutil.move(shard, store / shard.name)
        shard.symlink_to(store / shard.name)
    before = folder_hashes(store)
    code, output = invoke(
        "orthogonalize", "--model", model, "--direction", direction_file, "--out", store, "--overwrite", "--quiet"
    )
    assert code == 2, output
    assert "a file of the input model" in output
    assert folder_hashes(store) == before


def test_hf_cache_blobs_folder_is_refused_as_out(model, direction_file, tmp_path):
    """The Hub cache layout: snapshots/<commit>/<file> are links to ../../blobs/<sha256>."""
    repo = tmp_path / "hub" / "models--org--m"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = blobs / f"{i:064x}"
        shutil.copy2(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    before = folder_hashes(blobs)
    code, output = invoke(
        "orthogonalize", "--model", snapshot, "--direction", direction_file, "--out", blobs, "--overwrite", "--quiet"
    )
    assert code == 2 and "a file of the input model" in output, output
    assert folder_hashes(blobs) == before


def test_direction_never_writes_over_the_models_weights(model, tmp_path):
    before = folder_hashes(model)
    shard = sorted(model.glob("*.safetensors"))[0]
    code, output = invoke("direction", "--model", model, "--out", shard, "--overwrite", "--quiet")
    assert code == 2 and "overlaps the input model" in output, output
    code, output = invoke("direction", "--model", model, "--out", model, "--overwrite", "--quiet")
    assert code == 2 and "Traceback" not in output, output
    assert "overlaps the input model" in output
    assert folder_hashes(model) == before


@pytest.mark.parametrize("command", ["evaluate", "compare-directions", "verify-defence"])
def test_report_commands_never_write_into_the_model(model, tmp_path, command):
    before = folder_hashes(model)
    for out in (model, model / "report"):
        code, output = invoke(command, "--model", model, "--out", out, "--overwrite", "--langs", "en", "--quiet")
        assert code == 2 and "overlaps the input model" in output, output
    assert folder_hashes(model) == before


@pytest.mark.parametrize("command", ["evaluate", "compare-directions", "verify-defence"])
def test_existing_out_folder_needs_overwrite(model, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, output = invoke(command, "--model", model, "--out", out, "--langs", "en", "--quiet")
    assert code == 2 and "pass --overwrite" in output, output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_evaluate_validates_before_creating_anything(model, tmp_path):
    """A failing evaluation leaves no folder behind, not even the parents created for --out."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    out = tmp_path / "new" / "deeper" / "report"
    code, output = invoke("evaluate", "--model", model, "--prompts", bad, "--langs", "en", "--out", out, "--quiet")
    assert code == 2, output
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------
# Signals and debris
# ----------------------------------------------------------------------------------------------------------


def _start_and_freeze(tmp_path: Path) -> tuple[subprocess.Popen, Path, dict[str, str]]:
    src = _big_checkpoint(tmp_path / "big")
    direction = save_direction(Direction(vector=torch.randn(512)), tmp_path / "r.safetensors")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli("orthogonalize", "--model", src, "--direction", direction, "--out", out, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if [p for p in tmp_path.glob(".out.weightedit-tmp-*/*.safetensors") if p.stat().st_size > 0]:
            proc.send_signal(signal.SIGSTOP)
            return proc, src, folder_hashes(src)
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the edit finished before it could be interrupted")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, sig):
    proc, src, before = _start_and_freeze(tmp_path)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert f"interrupted by {signal.Signals(sig).name}" in stderr
    assert "temporary files were removed and no output was written" in stderr
    assert not (tmp_path / "out").exists()
    assert debris(tmp_path) == []
    assert folder_hashes(src) == before


def _copy2_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make copying the model's side files (config, tokenizer) fail once the output's shards are written."""
    real_copy2 = shutil.copy2

    def copy2(src, dst, *args, **kwargs):
        if TMP_MARKER in str(dst):
            raise exc
        return real_copy2(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy2)


def test_second_ctrl_c_during_cleanup_leaves_nothing(model, direction_file, tmp_path, monkeypatch):
    """Ctrl-C while the edit writes, then Ctrl-C again while the temporary folder is being removed."""
    real_rmtree = shutil.rmtree

    def rmtree_interrupted_once(path, *args, **kwargs):
        if TMP_MARKER in Path(path).name and not getattr(rmtree_interrupted_once, "done", False):
            rmtree_interrupted_once.done = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return real_rmtree(path, *args, **kwargs)

    _copy2_raising(monkeypatch, KeyboardInterrupt())
    monkeypatch.setattr(shutil, "rmtree", rmtree_interrupted_once)
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", tmp_path / "out")
    assert code == 130, output
    assert debris(tmp_path) == []
    assert "temporary files were removed" in output
    assert not (tmp_path / "out").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float = 3600) -> None:
    """Make ``path`` and its entries look untouched for ``seconds`` (as a temporary of a long-dead run)."""
    past = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (past, past), follow_symlinks=False)


def test_next_run_removes_stale_temporaries_of_dead_runs(model, direction_file, tmp_path):
    stale = tmp_path / f".out{TMP_MARKER}{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    _age(stale)
    fresh = tmp_path / f".out{TMP_MARKER}{_dead_pid()}-4567abcd"  # being written, maybe from another host
    fresh.mkdir()
    unknown = tmp_path / f".out{TMP_MARKER}89abcdef"  # an older weightedit's name: owner unknown
    unknown.mkdir()
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", tmp_path / "out")
    assert code == 0, output
    assert not stale.exists()
    assert f"removed {stale}" in " ".join(output.split())
    assert unknown.exists() and str(unknown) in " ".join(output.split())  # named, not deleted
    assert fresh.exists() and str(fresh) in " ".join(output.split())


def test_next_run_restores_an_output_a_killed_swap_set_aside(previous, model, direction_file, tmp_path):
    out, before = previous
    aside = tmp_path / f".out.weightedit-old-{_dead_pid()}-0123abcd"
    os.rename(out, aside)  # what a SIGKILL between the two renames of a swap leaves
    _age(aside)
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", out)
    assert code == 2 and "already exists" in output, output
    assert folder_hashes(out) == before
    assert debris(tmp_path) == []


def test_parent_folders_created_for_out_are_removed_on_failure(model, direction_file, tmp_path, monkeypatch):
    _copy2_raising(monkeypatch, OSError(errno.EIO, "Input/output error"))
    out = tmp_path / "a" / "b" / "out"
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", out, "--quiet")
    assert code == 2 and "Traceback" not in output, output
    assert not (tmp_path / "a").exists()


def test_disk_full_cleans_created_parents(model, direction_file, tmp_path):
    import resource

    out = tmp_path / "new" / "out"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        _cli("orthogonalize", "--model", model, "--direction", direction_file, "--out", out, "--quiet"),
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "not enough disk space" in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------
# Broken inputs: one line, exit code 2, never a traceback
# ----------------------------------------------------------------------------------------------------------


def _shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def _rewrite_header(shard: Path, edit) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])


def _edit_index(model: Path, edit) -> None:
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _tiny_gguf(path: Path, d: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, ff: int = 96) -> Path:
    """A tiny float32 llama GGUF that transformers can load (random weights, a 64-token vocabulary)."""
    import numpy as np
    from gguf import GGUFWriter, TokenType

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.NORMAL] * 61)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), d)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", d)
        tensor(f"blk.{i}.attn_q.weight", d, d)
        tensor(f"blk.{i}.attn_k.weight", kv * d // heads, d)
        tensor(f"blk.{i}.attn_v.weight", kv * d // heads, d)
        tensor(f"blk.{i}.attn_output.weight", d, d)
        tensor(f"blk.{i}.ffn_norm.weight", d)
        tensor(f"blk.{i}.ffn_gate.weight", ff, d)
        tensor(f"blk.{i}.ffn_up.weight", ff, d)
        tensor(f"blk.{i}.ffn_down.weight", d, ff)
    tensor("output_norm.weight", d)
    tensor("output.weight", len(tokens), d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _direction(tmp_path: Path, obj, name: str = "d.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# The broken-input cases: name -> (setup(model, work folder) -> CLI args, text the one-line error must contain).
BROKEN = {
    "direction file holding a list": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", _direction(t, [1.0, 2.0]), "--out", t / "o"],
        "holds a list, not a tensor",
    ),
    "direction file holding a string": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", _direction(t, "text"), "--out", t / "o"],
        "holds a str, not a tensor",
    ),
    "direction with invalid JSON metadata": (
        lambda m, t: [
            "orthogonalize",
            "--model",
            m,
            "--direction",
            _safetensors(t, {"direction": torch.randn(64)}, {"meta": "{oops"}),
            "--out",
            t / "o",
        ],
        "'meta' metadata is not valid JSON",
    ),
    "direction with JSON list metadata": (
        lambda m, t: [
            "orthogonalize",
            "--model",
            m,
            "--direction",
            _safetensors(t, {"direction": torch.randn(64)}, {"meta": "[1, 2]"}),
            "--out",
            t / "o",
        ],
        "is a JSON list, not an object",
    ),
    "int direction": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", _direction(t, torch.ones(64, dtype=torch.int64))],
        "dtype int64",
    ),
    "bool direction": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", _direction(t, torch.ones(64, dtype=torch.bool))],
        "dtype bool",
    ),
    "complex direction": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", _direction(t, torch.randn(64, dtype=torch.cfloat))],
        "dtype complex64",
    ),
    "direction path is a folder": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", t, "--out", t / "o"],
        "is a folder",
    ),
    "direction path is a FIFO": (
        lambda m, t: ["orthogonalize", "--model", m, "--direction", _fifo(t / "pipe.safetensors"), "--out", t / "o"],
        "not a regular file",
    ),
    "__metadata__ is a list": (
        lambda m, t: _with(lambda: _rewrite_header(_shard(m), lambda h: h.update(__metadata__=["x"])), m, t),
        "__metadata__ is a JSON list",
    ),
    "float shape in a header": (
        lambda m, t: _with(lambda: _rewrite_header(_shard(m), _float_shape), m, t),
        "must be whole numbers",
    ),
    "weight_map holds a non-string": (
        lambda m, t: _with(lambda: _edit_index(m, lambda i: i["weight_map"].update({_first(i): 3})), m, t),
        "not to a shard file name",
    ),
    "index maps a tensor to the wrong shard": (
        lambda m, t: _with(lambda: _edit_index(m, _wrong_shard), m, t),
        "maps tensor '",
    ),
    "config.json is not an object": (
        lambda m, t: _with(lambda: (m / "config.json").write_text("[1, 2]"), m, t),
        "holds a JSON list, not an object",
    ),
    "empty --model": (
        lambda m, t: ["orthogonalize", "--model", "", "--direction", _any_direction(t), "--out", t / "o"],
        "--model is empty",
    ),
    "GGUF truncated inside its header": (
        lambda m, t: ["inspect", "--model", _truncated_gguf(t)],
        "truncated or corrupted inside its GGUF header",
    ),
    "file named .gguf that is not GGUF": (
        lambda m, t: ["inspect", "--model", _with_file(t, "fake.gguf", "not a gguf at all") / "fake.gguf"],
        "is not a GGUF file",
    ),
    "direction --out is an existing folder": (
        lambda m, t: ["direction", "--model", m, "--out", t, "--overwrite", "--quiet"],
        "is a folder: pass a file name",
    ),
    "model folder without tokenizer files": (
        lambda m, t: ["direction", "--model", m, "--out", t / "r.safetensors", "--quiet"],
        "has no tokenizer files",
    ),
    "--out below an existing file": (
        lambda m, t: _with(lambda: (t / "afile").write_text("x"), m, t, out=t / "afile" / "sub"),
        "which is a file, not a folder",
    ),
    "--out name over NAME_MAX": (
        lambda m, t: _with(lambda: None, m, t, out=t / ("n" * 300)),
        "over the file system's limit",
    ),
    "--out path over PATH_MAX": (
        lambda m, t: _with(lambda: None, m, t, out=t.joinpath(*["p" * 200] * 25)),
        "PATH_MAX",
    ),
    "card with malformed weightedit.json": (
        lambda m, t: ["card", "--model", _with_file(m, "weightedit.json", "{oops")],
        "weightedit.json is not valid JSON",
    ),
    "card with report.json holding a list": (
        lambda m, t: ["card", "--model", _with_file(m, "weightedit.json", "{}"), "--report", _report_list(t)],
        "report.json holds a JSON list",
    ),
}


def _safetensors(t: Path, tensors, metadata) -> Path:
    path = t / "d.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _any_direction(t: Path) -> Path:
    return save_direction(Direction(vector=random_direction()), t / "any.safetensors")


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _with(prepare, m: Path, t: Path, *, out: Path | None = None) -> list:
    prepare()
    return ["orthogonalize", "--model", m, "--direction", _any_direction(t), "--out", out or t / "o", "--quiet"]


def _with_file(m: Path, name: str, text: str) -> Path:
    (m / name).write_text(text)
    return m


def _report_list(t: Path) -> Path:
    (t / "rep").mkdir()
    (t / "rep" / "report.json").write_text("[]")
    return t / "rep"


def _first(index: dict) -> str:
    return sorted(index["weight_map"])[0]


def _float_shape(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [float(s) + 0.5 for s in header[name]["shape"]]


def _wrong_shard(index: dict) -> None:
    wm = index["weight_map"]
    a = _first(index)
    other = next(v for v in wm.values() if v != wm[a])
    wm[a] = other


def _truncated_gguf(t: Path) -> Path:
    full = _tiny_gguf(t / "full.gguf").read_bytes()
    path = t / "cut.gguf"
    path.write_bytes(full[:200])
    return path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_input_gives_one_line_and_exit_2(case, model, tmp_path):
    setup, expected = BROKEN[case]
    work = tmp_path / "work"
    work.mkdir()
    args = setup(model, work)
    if "--out" not in map(str, args) and args[0] == "orthogonalize":
        args += ["--out", work / "o"]
    before = folder_hashes(model)
    code, output = invoke(*args)
    assert code == 2, output
    assert "Traceback" not in output, output
    assert output.count("error:") == 1, output
    assert expected in " ".join(output.split()), output
    assert not (work / "o").exists()
    assert debris(work) == [] and debris(tmp_path) == []
    if case not in ("card with malformed weightedit.json", "card with report.json holding a list"):
        changed = {k for k, v in folder_hashes(model).items() if before.get(k) != v}
        assert changed <= {"config.json", "model.safetensors.index.json", _shard(model).name}  # only our own edits


def test_unreadable_side_file_is_one_line(model, direction_file, tmp_path, monkeypatch):
    """A tokenizer file the user may not read (root reads everything, so the refusal is injected at the OS call)."""
    (model / "tokenizer.json").write_text("{}")
    real_copy2 = shutil.copy2

    def copy2(src, dst, *args, **kwargs):
        if Path(src).name == "tokenizer.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        return real_copy2(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy2)
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in output, output
    assert "cannot read" in output and "tokenizer.json" in output
    assert debris(tmp_path) == [] and not (tmp_path / "o").exists()


def test_out_appearing_at_the_rename_is_not_replaced(model, direction_file, tmp_path, monkeypatch):
    """The check-then-rename race: another process creates --out just before the final rename."""
    out = tmp_path / "out"
    real_rename, real_replace, real_rename2 = os.rename, os.replace, atomic._rename2

    def racing(real):
        def call(src, dst, *args, **kwargs):
            if TMP_MARKER in Path(src).name and Path(dst) == out and not out.exists():
                out.mkdir()
                (out / "theirs.txt").write_text("not yours")
            return real(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "rename", racing(real_rename))
    monkeypatch.setattr(os, "replace", racing(real_replace))
    monkeypatch.setattr(atomic, "_rename2", racing(real_rename2), raising=False)
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", out)
    assert code == 2 and "Traceback" not in output, output
    assert "appeared while writing" in output
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert debris(tmp_path) == []


def test_out_name_at_the_name_limit_works(model, direction_file, tmp_path):
    out = tmp_path / ("n" * 250)  # fits, but the temporary sibling's name must be shortened to fit too
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", out, "--quiet")
    assert code == 0, output
    assert (out / "weightedit.json").is_file() and debris(tmp_path) == []


def test_float64_direction_beyond_float32_range_keeps_its_direction(model, tmp_path):
    r = random_direction().double() * 1e300
    path = tmp_path / "big.pt"
    torch.save(r, path)
    out = tmp_path / "o"
    code, output = invoke("orthogonalize", "--model", model, "--direction", path, "--out", out, "--quiet")
    assert code == 0, output
    from weightedit.edit.direction_file import load_direction

    v = load_direction(path).vector
    assert torch.isfinite(v).all()
    scaled = r / r.abs().max()  # in range, same direction
    assert float(torch.nn.functional.cosine_similarity(v.double(), scaled, dim=0)) > 1 - 1e-6


# ----------------------------------------------------------------------------------------------------------
# First-hour problems
# ----------------------------------------------------------------------------------------------------------


def test_allow_model_mismatch_is_recorded(model, tmp_path):
    path = save_direction(
        Direction(vector=random_direction(), model="other/model", config_hash="0123456789abcdef"),
        tmp_path / "r.safetensors",
    )
    out = tmp_path / "o"
    args = ["orthogonalize", "--model", model, "--direction", path, "--out", out, "--quiet", "--allow-model-mismatch"]
    code, output = invoke(*args)
    assert code == 0, output
    assert json.loads((out / "weightedit.json").read_text())["options"]["allow_model_mismatch"] is True


def test_no_absolute_local_path_in_published_files(model, direction_file, tmp_path):
    out = tmp_path / "o"
    code, output = invoke("orthogonalize", "--model", model, "--direction", direction_file, "--out", out, "--quiet")
    assert code == 0, output
    text = (out / "weightedit.json").read_text()
    assert str(tmp_path) not in text
    provenance = json.loads(text)
    assert provenance["source"]["model"] == "./model"
    assert provenance["direction"]["file"] == "r.safetensors"
    for shard in out.glob("*.safetensors"):
        (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
        assert str(tmp_path) not in shard.read_bytes()[8 : 8 + n].decode()


def test_total_parameters_counts_the_added_lm_head(tiny_checkpoints, direction_file, tmp_path):
    src = tiny_checkpoints("gemma")  # tied: the edit adds lm_head.weight
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert "total_parameters" in index["metadata"]
    out = tmp_path / "o"
    code, output = invoke("orthogonalize", "--model", src, "--direction", direction_file, "--out", out, "--quiet")
    assert code == 0, output
    from helpers import load_tensors

    tensors = load_tensors(out)
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert meta["total_parameters"] > index["metadata"]["total_parameters"]


@pytest.mark.parametrize("command", ["direction", "orthogonalize", "evaluate", "compare-directions", "verify-defence"])
def test_every_model_loading_command_takes_trust_remote_code(command):
    code, output = invoke(command, "--help")
    assert code == 0 and "--trust-remote-code" in output, output


def test_push_in_offline_mode_says_so_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    code, output = invoke("push", "--model", folder, "--repo-id", "me/x", "--token", "hf_x")
    assert code == 2 and "offline mode is on" in output, output
    assert time.perf_counter() - started < 5  # no retries against a Hub it may not reach


def test_direction_inside_an_output_model_goes_to_a_subfolder(tmp_path):
    root = tmp_path / "planted"
    model = make_planted_model(root / "model", random_direction(seed=5))
    prompts = write_planted_prompts(root / "prompts.jsonl")
    # A scratch folder a killed run left in the cache is found and removed by the next run.
    from weightedit.io.cache import cache_dir

    stale = cache_dir() / "tmp" / f".direction{TMP_MARKER}{_dead_pid()}-0123abcd"
    stale.mkdir(parents=True)
    _age(stale)
    out = tmp_path / "o"
    args = ["orthogonalize", "--model", model, "--direction-lang", "en", "--prompts", prompts]
    code, output = invoke(
        *args, "--n-train", 24, "--n-val", 8, "--top-k", 2, "--check-generations", 0, "--out", out, "--quiet"
    )
    assert code == 0, output
    top = sorted(p.name for p in out.glob("*.safetensors"))
    assert top == sorted(p.name for p in model.glob("*.safetensors"))
    assert (out / "weightedit" / "refusal_direction.safetensors").is_file()
    assert not stale.exists() and debris(cache_dir() / "tmp") == []
    for name in ("refusal_direction.scores.json", "refusal_direction.safetensors"):
        assert str(tmp_path) not in (out / "weightedit" / name).read_bytes().decode("utf-8", "replace")[:100_000]


def test_fetch_prints_the_folder_on_stdout(tiny_checkpoints, tmp_path):
    """`$(weightedit fetch NAME)` is the model's folder: only the path goes to stdout."""
    commit = "c" * 40
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_checkpoints("llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny.yaml").write_text(
        "name: tiny-test\ndescription: a tiny test model\nhub_id: org/tiny\nrevision: main\n"
        "license: apache-2.0\narchitecture: llama\nsource: hub\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "WEIGHTEDIT_RECIPES": str(recipes),
    }
    env.pop("HF_HUB_CACHE", None)
    for extra in ([], ["--quiet"]):
        proc = subprocess.run(_cli("fetch", "tiny-test", *extra), capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).resolve() == snapshot.resolve(), proc.stdout


@pytest.mark.parametrize("command", ["evaluate", "compare-directions", "verify-defence"])
def test_output_folder_not_writable(model, command):
    """sysfs refuses new folders even to root (a read-only or foreign folder does the same to a user)."""
    out = Path("/sys") / f"weightedit-test-{os.getpid()}" / "report"
    code, output = invoke(command, "--model", model, "--out", out, "--langs", "en", "--quiet")
    assert code == 2 and "Traceback" not in output, output
    assert "is not writable" in " ".join(output.split()), output
    assert not out.parent.exists()


def test_readme_error_table_names_tests_that_exist():
    """Every row of the README's error table names its test, and every named test (or case) exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| bad input")]
    assert len(rows) >= 40
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 3 and cells[2], row
        for module, name in re.findall(r"`(test_\w+)::([^`\[]+|…)", cells[2]):
            source = (root / "tests" / f"{module}.py").read_text(encoding="utf-8")
            if name == "…":
                continue
            assert f"def {name}(" in source, f"{module}::{name} (README row {cells[0]!r})"
        for case in re.findall(r"`(?:test_reliability::…)?\[([^\]]+)\]`", cells[2]):
            assert case in BROKEN, (case, row)


def test_evaluate_report_names_models_without_local_paths(tmp_path):
    """report.json (and the plot titles drawn from it) name local models ./<folder>, not by absolute path."""
    from weightedit.edit.rewrite import orthogonalize_checkpoint

    base = make_planted_model(tmp_path / "base", random_direction(seed=5))
    edited = orthogonalize_checkpoint(base, tmp_path / "edited", random_direction(seed=5), progress=False).out
    prompts = write_planted_prompts(tmp_path / "prompts.jsonl", n_train=8, n_val=8)
    out = tmp_path / "report"
    args = ["evaluate", "--model", edited, "--baseline", base, "--langs", "en", "--prompts", prompts]
    code, output = invoke(*args, "--limit", 4, "--ppl-limit", 2, "--out", out, "--quiet")
    assert code == 0, output
    models = json.loads((out / "report.json").read_text())["models"]
    assert models["edited"]["id"] == "./edited" and models["baseline"]["id"] == "./base"
    assert str(tmp_path) not in json.dumps(models)
    assert debris(tmp_path) == []


def test_demo_refuses_a_folder_that_is_not_its_own(model, tmp_path, monkeypatch):
    """demo reuses its own --out folder, but never writes into a model folder (or anyone else's folder)."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny.yaml").write_text(
        "name: tiny-test\ndescription: a tiny test model\nhub_id: org/tiny-not-cached\nrevision: main\n"
        "license: apache-2.0\narchitecture: llama\nsource: hub\n"
    )
    monkeypatch.setenv("WEIGHTEDIT_RECIPES", str(recipes))
    before = folder_hashes(model)
    code, output = invoke("demo", "--recipe", "tiny-test", "--out", model, "--quiet")
    assert code == 2 and "not a weightedit demo folder" in output, output
    assert folder_hashes(model) == before


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [("--generate", "-2", "must be 0 (none) or more"), ("--max-new-tokens", "0", "must be at least 1")],
)
def test_demo_rejects_bad_evaluation_options_before_fetching(tmp_path, monkeypatch, flag, value, problem):
    """A bad evaluation option is an exit-2 line before the demo fetches anything, not after its direction."""
    import weightedit.demo as demo

    def no_fetch(*args, **kwargs):
        raise AssertionError("the demo fetched a model before checking its options")

    monkeypatch.setattr(demo, "fetch_recipe", no_fetch)
    code, output = invoke("demo", "--out", tmp_path / "demo", flag, value, "--quiet")
    assert code == 2 and f"{flag} {value}: {problem}" in " ".join(output.split()), output
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_quiet_silences_the_libraries_progress_bars(tmp_path, flag):
    """Converting a GGUF draws three progress bars in transformers; --quiet (and --json) must draw none."""
    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")}
    env["WEIGHTEDIT_CACHE"] = str(tmp_path / "cache")
    command = ["inspect", "--model", gguf, "--json"] if flag == "--json" else None
    if command is None:
        direction = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
        command = ["orthogonalize", "--model", gguf, "--direction", direction, "--out", tmp_path / "o", "--quiet"]
    proc = subprocess.run(_cli(*command), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr, proc.stderr  # tqdm's bars
    if flag == "--json":
        assert proc.stderr == "", proc.stderr


def test_outputs_written_inside_a_scratch_folder_are_not_reported_as_kept(tmp_path):
    """An interrupt's message lists the outputs already complete and kept: not the checkpoints an attack wrote
    into a scratch folder, which the folder's removal took with it (verify-defence listed them as kept)."""
    atomic.reset_state()
    kept = atomic.write_text_atomic(tmp_path / "kept.txt", "x")
    with atomic.scratch_dir(tmp_path / "cache", "defence") as scratch:
        atomic.write_text_atomic(scratch / "attack0.txt", "y")
        assert len(atomic.committed_outputs()) == 2
    assert atomic.committed_outputs() == [kept]
    atomic.reset_state()
