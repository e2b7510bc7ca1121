"""Per-layer directions: a direction file with one row per decoder layer, edited exactly on disk and in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from weightedit.edit.direction_file import Direction, load_direction, peek_direction, save_direction
from weightedit.edit.in_memory import orthogonalize_model_, temporarily_edited, untie_embeddings_
from weightedit.edit.profile import EditProfile, LayerKernel
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.errors import InvalidDirectionError

from helpers import load_tensors
from tiny_models import input_ids, random_direction

TOLERANCE = 1e-4
SHAPED = EditProfile(
    attention=LayerKernel(center=0.0, peak=0.9, width=1.5, floor=0.3),
    mlp=LayerKernel(center=1.0, peak=1.1, width=1.0, floor=0.2),
    embedding=0.7,
)


def rows(n_layers: int, seed: int = 11) -> torch.Tensor:
    return torch.stack([random_direction(seed=seed + i) for i in range(n_layers)])


def n_layers_of(folder) -> int:
    config = json.loads((folder / "config.json").read_text())
    return config.get("num_hidden_layers") or config["n_layer"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("profile", [None, SHAPED], ids=["full", "shaped"])
def test_written_per_layer_edit_equals_the_in_memory_one(family, profile, tiny_checkpoints, tmp_path):
    """Each decoder layer's writers lose their own row (post-norm writers its γ-weighted form), the embeddings
    the direction's vector; the file goes through the streaming rewrite and matches the in-memory edit."""
    src = tiny_checkpoints(family)
    layers = rows(n_layers_of(src))
    direction = Direction(vector=random_direction(seed=3), layer_vectors=layers, profile=profile)
    path = save_direction(direction, tmp_path / "r.safetensors")
    report = orthogonalize_checkpoint(src, tmp_path / "out", path, progress=False)
    recorded = report.provenance["direction"]
    assert recorded["sha256"] == direction.sha256() and recorded["layer_rows"] == len(layers)

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    in_memory = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    global_edit = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    orthogonalize_model_(in_memory, load_direction(path))
    orthogonalize_model_(global_edit, direction.vector, profile=profile)
    ids = input_ids()
    with torch.inference_mode():
        got, want, one = edited(ids).logits, in_memory(ids).logits, global_edit(ids).logits
    assert (got - want).abs().max().item() <= TOLERANCE
    # The rows are used: one direction everywhere computes something else.
    assert (got - one).abs().max() > 100 * TOLERANCE


def test_rows_all_equal_to_the_vector_write_the_global_edit(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("gemma2")
    r = random_direction(seed=5)
    same = r.expand(n_layers_of(src), -1).clone()
    orthogonalize_checkpoint(src, tmp_path / "global", Direction(vector=r, profile=SHAPED), progress=False)
    orthogonalize_checkpoint(
        src, tmp_path / "rows", Direction(vector=r, layer_vectors=same, profile=SHAPED), progress=False
    )
    a, b = load_tensors(tmp_path / "global"), load_tensors(tmp_path / "rows")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tensor_of_rows_edits_temporarily_as_the_written_direction_does(tiny_checkpoints, tmp_path):
    """A ``[n_layers, d]`` tensor is the per-layer direction whose row 0 serves the embeddings, in memory (undone
    exactly) and in the streaming rewrite; both compute what the direction file with those rows writes."""
    src = tiny_checkpoints("llama")
    layers = rows(n_layers_of(src))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    untie_embeddings_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_direction(Direction(vector=layers[0], layer_vectors=layers, profile=SHAPED), tmp_path / "r.safetensors")
    orthogonalize_checkpoint(src, tmp_path / "file", path, progress=False)
    report = orthogonalize_checkpoint(src, tmp_path / "tensor", layers, profile=SHAPED, progress=False)
    assert report.provenance["direction"]["layer_rows"] == len(layers)
    from_file = AutoModelForCausalLM.from_pretrained(tmp_path / "file", dtype=torch.float32).eval()
    from_tensor = AutoModelForCausalLM.from_pretrained(tmp_path / "tensor", dtype=torch.float32).eval()
    ids = input_ids()
    with torch.inference_mode():
        with temporarily_edited(model, layers, SHAPED):
            got = model(ids).logits
        want, written = from_file(ids).logits, from_tensor(ids).logits
    assert (got - want).abs().max().item() <= TOLERANCE and (written - want).abs().max().item() <= TOLERANCE
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # A file and the same direction in hand hash alike (the file's rows are read with NumPy, the object's with torch).
    in_hand = orthogonalize_checkpoint(src, tmp_path / "hand", load_direction(path), progress=False)
    by_file = json.loads((tmp_path / "file" / "weightedit.json").read_text())
    assert in_hand.provenance["direction"]["sha256"] == by_file["direction"]["sha256"] == load_direction(path).sha256()


def test_rows_for_another_depth_are_refused_in_memory(tiny_checkpoints):
    src = tiny_checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with pytest.raises(InvalidDirectionError, match="directions for 3 decoder layers but the model has 2"):
        orthogonalize_model_(model, rows(3))


def test_the_rows_round_trip_and_are_part_of_the_hash(tmp_path):
    r, layers = random_direction(), rows(2)
    # The vector may be a view of a row (what optimize writes): saved as two tensors all the same.
    save_direction(Direction(vector=layers[0], layer_vectors=layers), tmp_path / "view.safetensors")
    assert torch.equal(load_direction(tmp_path / "view.safetensors").vector, layers[0])
    path = save_direction(Direction(vector=r, layer_vectors=layers), tmp_path / "r.safetensors")
    back = load_direction(path)
    assert back.layer_vectors is not None and torch.equal(back.layer_vectors, layers)
    header = peek_direction(path)  # the rewrite reads the rows with NumPy, without torch
    assert header is not None and header.n_layer_rows == 2
    rows_np = header.load_rows()
    assert rows_np is not None and torch.equal(torch.from_numpy(rows_np), layers)
    assert Direction(vector=r).sha256() != back.sha256() != Direction(vector=r, layer_vectors=rows(2, seed=40)).sha256()


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 64), torch.randn(2, 63), torch.randn(64), torch.full((2, 64), float("nan"))],
    ids=["zero rows", "wrong width", "not rows", "nan"],
)
def test_broken_rows_are_refused(bad, tiny_checkpoints, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"direction": random_direction(), "layer_directions": bad.contiguous()}, str(path))
    with pytest.raises(InvalidDirectionError, match="layer_directions"):
        load_direction(path)
    # The rewrite reads them from the file's header with NumPy: refused before anything is written.
    with pytest.raises(InvalidDirectionError):
        orthogonalize_checkpoint(tiny_checkpoints("llama"), tmp_path / "out", path, progress=False)
    assert not (tmp_path / "out").exists()
    # And they are never saved.
    if bad.ndim == 2:
        with pytest.raises(InvalidDirectionError, match="layer_directions"):
            save_direction(Direction(vector=random_direction(), layer_vectors=bad), tmp_path / "again.safetensors")
        assert not (tmp_path / "again.safetensors").exists()


def test_rows_for_another_depth_are_refused_before_anything_is_written(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama")
    direction = Direction(vector=random_direction(), layer_vectors=rows(n_layers_of(src) + 1))
    with pytest.raises(InvalidDirectionError, match="decoder layers but the model has"):
        orthogonalize_checkpoint(src, tmp_path / "out", direction, progress=False)
    assert not (tmp_path / "out").exists()
