"""The streaming edit starts copying before torch is imported, and gives the same checkpoint as it did before.

Given a direction *file*, the rewrite checks the file's metadata without torch, creates the output shards and
starts a lane on the untouched bytes; torch imports and the vector loads meanwhile, and the final headers (with
the direction's hash) are written before any edit. These tests pin down that this changes nothing a user sees:
same bytes, same refusals of bad directions before anything is written, nothing left behind on a failure.
"""

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
    # The headers carry the loaded vector's hash, not the placeholder they were laid out with.
    for shard in from_file.out.glob("*.safetensors"):
        assert read_header(shard).metadata["weightedit_direction_sha256"] == loaded.sha256()
    provenance = json.loads((from_file.out / "weightedit.json").read_text())
    assert provenance["direction"]["file"] == "r.safetensors"


def test_copying_starts_before_torch_is_imported(tiny_checkpoints, tmp_path):
    """In a fresh interpreter: when torch is first imported, the lane that copies is already running."""
    src = tiny_checkpoints("llama")
    path = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
    code = f"""
import importlib.abc, json, sys, threading
seen = {{}}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and "lane" not in seen:
            seen["lane"] = [t.name for t in threading.enumerate()]
        return None
sys.meta_path.insert(0, Watch())
from weightedit.edit.rewrite import orthogonalize_checkpoint
report = orthogonalize_checkpoint({str(src)!r}, {str(tmp_path / "out")!r}, {str(path)!r}, progress=False)
print(json.dumps({{"lanes": seen.get("lane"), "edited": report.tensors_edited}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["lanes"] is not None, "torch was never imported"
    assert "weightedit-edit" in result["lanes"]
    assert result["edited"] > 0


def test_a_direction_that_failed_its_filter_is_refused_before_anything_is_written(tiny_checkpoints, tmp_path):
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


def test_a_vector_that_fails_to_load_after_the_copy_started_leaves_nothing(tiny_checkpoints, tmp_path):
    """Metadata fine, vector all zeros: found once the vector is loaded (the copy is running then)."""
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
