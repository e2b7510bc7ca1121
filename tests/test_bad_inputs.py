"""Every bad input in the README's error table: one line, exit code 2, nothing changed, no output."""

from __future__ import annotations

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
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.edit.direction_file import Direction, save_direction

from helpers import folder_hashes
from tiny_models import random_direction


@pytest.fixture()
def model_copy(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoints("llama"), folder)
    return folder


@pytest.fixture()
def direction_file(tmp_path) -> Path:
    return save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_refused(args, expected: str, model: Path, out: Path) -> None:
    before = folder_hashes(model) if model.exists() else None
    code, output = invoke("orthogonalize", *args, "--quiet")
    assert code == 2, output
    assert expected in output, output
    assert output.count("error:") == 1
    if before is not None:
        assert folder_hashes(model) == before
    assert not out.exists() or out.is_dir() and any(out.iterdir())  # pre-existing outputs stay as they were
    assert not list(out.parent.glob(f".{out.name}.weightedit-tmp-*"))


def test_missing_model_path(tmp_path, direction_file):
    out = tmp_path / "out"
    assert_refused(
        ["--model", tmp_path / "nope", "--direction", direction_file, "--out", out],
        "does not exist",
        tmp_path / "nope",
        out,
    )
    assert not out.exists()


def test_folder_without_config(tmp_path, direction_file):
    folder = tmp_path / "empty"
    folder.mkdir()
    out = tmp_path / "out"
    assert_refused(["--model", folder, "--direction", direction_file, "--out", out], "no config.json", folder, out)


def test_unsupported_architecture_lists_supported_ones(model_copy, direction_file, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "falcon"
    (model_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(
        ["--model", model_copy, "--direction", direction_file, "--out", out],
        "unsupported architecture 'falcon'",
        model_copy,
        out,
    )
    code, output = invoke("orthogonalize", "--model", model_copy, "--direction", direction_file, "--out", out)
    assert "llama" in output and "qwen2" in output and "gpt2" in output


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (torch.randn(65), "d_model=65"),
        (torch.zeros(64), "zero norm"),
        (torch.full((64,), float("nan")), "non-finite"),
    ],
)
def test_bad_direction(vector, message, model_copy, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"direction": vector}, str(path))
    out = tmp_path / "out"
    assert_refused(["--model", model_copy, "--direction", path, "--out", out], message, model_copy, out)
    assert not out.exists()


def test_direction_from_another_model_is_refused(model_copy, tmp_path):
    path = save_direction(
        Direction(vector=random_direction(), model="other/model", config_hash="0123456789abcdef"),
        tmp_path / "r.safetensors",
    )
    out = tmp_path / "out"
    assert_refused(
        ["--model", model_copy, "--direction", path, "--out", out], "--allow-model-mismatch", model_copy, out
    )
    code, output = invoke(
        "orthogonalize", "--model", model_copy, "--direction", path, "--out", out, "--allow-model-mismatch", "--quiet"
    )
    assert code == 0, output


def test_out_equal_to_or_inside_input(model_copy, direction_file):
    for out in (model_copy, model_copy / "sub"):
        assert_refused(
            ["--model", model_copy, "--direction", direction_file, "--out", out, "--overwrite"],
            "overlaps the input",
            model_copy,
            out,
        )
    assert not (model_copy / "sub").exists()


def test_out_that_contains_the_input(model_copy, direction_file):
    parent = model_copy.parent
    before = folder_hashes(model_copy)
    code, output = invoke(
        "orthogonalize", "--model", model_copy, "--direction", direction_file, "--out", parent, "--overwrite"
    )
    assert code == 2 and "overlaps the input" in output
    assert folder_hashes(model_copy) == before


def test_existing_out_without_overwrite(model_copy, direction_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(["--model", model_copy, "--direction", direction_file, "--out", out], "--overwrite", model_copy, out)
    assert (out / "keep.txt").read_text() == "mine"


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def test_corrupted_header(model_copy, direction_file, tmp_path):
    shard = _first_shard(model_copy)
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"#corrupt!#"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_refused(
        ["--model", model_copy, "--direction", direction_file, "--out", out],
        "corrupted safetensors header",
        model_copy,
        out,
    )
    assert not out.exists()


def test_truncated_shard(model_copy, direction_file, tmp_path):
    shard = _first_shard(model_copy)
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    assert_refused(
        ["--model", model_copy, "--direction", direction_file, "--out", out], "is truncated", model_copy, out
    )
    assert not out.exists()


def test_quantized_checkpoint(model_copy, direction_file, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(
        ["--model", model_copy, "--direction", direction_file, "--out", out],
        "quantized checkpoint (gptq)",
        model_copy,
        out,
    )
    assert not out.exists()


def test_both_or_neither_direction_option(model_copy, tmp_path):
    out = tmp_path / "out"
    assert_refused(["--model", model_copy, "--out", out], "exactly one of --direction", model_copy, out)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightedit.cli.main", *map(str, args)]


def test_disk_full_during_write(model_copy, direction_file, tmp_path):
    """A file-size limit makes the kernel refuse writes part-way, as a full disk does."""
    import resource

    out = tmp_path / "out"
    before = folder_hashes(model_copy)
    limit = 20_000  # bytes: smaller than the first shard

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        _cli("orthogonalize", "--model", model_copy, "--direction", direction_file, "--out", out, "--quiet"),
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not enough disk space" in proc.stderr
    assert folder_hashes(model_copy) == before
    assert not out.exists()
    assert not list(tmp_path.glob(".out.weightedit-tmp-*"))


def _big_checkpoint(folder: Path) -> Path:
    """A llama-shaped checkpoint whose embedding alone is 128 MB, so writing it takes a while."""
    folder.mkdir()
    d, vocab = 512, 65536
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d,
        "intermediate_size": 1024,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
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
            "model.layers.0.mlp.down_proj.weight": torch.randn(d, 1024, generator=g),
        },
        str(folder / "model.safetensors"),
    )
    return folder


def test_ctrl_c_during_write_leaves_nothing(tmp_path):
    src = _big_checkpoint(tmp_path / "big")
    direction = save_direction(Direction(vector=torch.randn(512)), tmp_path / "r.safetensors")
    before = folder_hashes(src)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli("orthogonalize", "--model", src, "--direction", direction, "--out", out, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # Wait until the temporary output holds a partly written shard, then freeze the process there.
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".out.weightedit-tmp-*/*.safetensors") if p.stat().st_size > 0]
        if partial:
            proc.send_signal(signal.SIGSTOP)
            break
        time.sleep(0.005)
    assert partial, "the edit finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.weightedit-tmp-*"))
    assert folder_hashes(src) == before


MODEL_COMMANDS = [
    ["direction", "--out", "r.safetensors"],
    ["evaluate", "--out", "report"],
    ["compare-directions", "--out", "cmp"],
    ["verify-defence", "--out", "defence"],
    ["inspect"],
]


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c[0])
def test_every_model_command_takes_gguf_file(tmp_path, monkeypatch, command):
    """A folder holding a .gguf: each command names --gguf-file, and passes its value through to the resolver."""
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "m.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    quiet = [] if command[0] == "inspect" else ["--quiet"]
    code, output = invoke(*command, "--model", folder, *quiet)
    assert code == 2, output
    assert "pass --gguf-file m.Q4.gguf" in output, output
    code, output = invoke(*command, "--model", folder, "--gguf-file", "other.gguf", *quiet)
    assert code == 2, output
    assert "--gguf-file other.gguf is not in" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ggufs"]  # no output of any kind
