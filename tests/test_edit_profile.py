"""Shaped edits: a share λ of the direction per writer, and norm-preserving edits (weightedit.edit.profile)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from weightedit.edit.arch import spec_for_config
from weightedit.edit.direction_file import Direction, load_direction, save_direction
from weightedit.edit.in_memory import orthogonalize_model_
from weightedit.edit.profile import FULL_EDIT, EditProfile, LayerKernel, component_of
from weightedit.edit.projection import noise_floor, project_columns_, project_columns_streamed, project_out_
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.errors import InvalidDirectionError, OptionsError

from helpers import load_tensors, raw_bytes
from tiny_models import FAMILY_CONFIGS, input_ids, random_direction

TOLERANCE = 1e-4
SHAPED = EditProfile(
    attention=LayerKernel(center=0.3, peak=0.9, width=1.5, floor=0.2),
    mlp=LayerKernel(center=1.0, peak=1.3, width=0.8, floor=0.0),
    embedding=0.5,
)


def reference(w: torch.Tensor, u: torch.Tensor, axis: int, scale: float, keep: bool) -> torch.Tensor:
    """``v - λ (v·u) u`` for every residual-stream vector ``v`` of ``w``, rescaled to ``‖v‖`` if ``keep``, in float64."""
    x = w.double().movedim(axis, -1)
    ud = u.double()
    comp = x @ ud
    y = x - scale * comp[..., None] * ud
    if keep:
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True))
    return y.movedim(-1, axis)


# --- the kernel ---------------------------------------------------------------------------------------------


def test_kernel_is_a_linear_falloff_to_the_floor():
    kernel = LayerKernel(center=4.5, peak=1.2, width=3.0, floor=0.3)
    layers = np.arange(12)
    # The same profile as a piecewise-linear curve through its corners, written independently of weight().
    want = np.interp(np.abs(layers - 4.5), [0.0, 3.0, 100.0], [1.2, 0.3, 0.3])
    got = [kernel.weight(int(layer)) for layer in layers]
    assert np.allclose(got, want)
    assert LayerKernel(center=2).weight(40) == 1.0  # width inf: the peak everywhere


@pytest.mark.parametrize(
    "kwargs",
    [dict(center=1, peak=-0.1), dict(center=1, peak=2.5), dict(center=1, width=0), dict(center=math.nan)],
)
def test_kernel_rejects_values_out_of_range(kwargs):
    with pytest.raises(OptionsError) as info:
        LayerKernel(**kwargs)
    assert info.value.option in kwargs


def test_profile_weights_by_component_and_json_round_trip():
    assert component_of("attn_out_bias").value == "attention"
    assert component_of("moe_expert_out").value == "mlp"
    assert component_of("position_embedding").value == "embedding"
    assert SHAPED.weight("embedding", None) == 0.5
    assert SHAPED.weight("attn_out", 0) == pytest.approx(0.9 + (0.2 - 0.9) * 0.3 / 1.5)
    assert SHAPED.weight("mlp_out", 0) == 0.0
    assert EditProfile.from_json(json.loads(json.dumps(SHAPED.to_json()))) == SHAPED
    assert FULL_EDIT.is_full and not SHAPED.is_full
    assert EditProfile(mlp=LayerKernel(center=3, peak=1.0, floor=1.0, width=2)).is_full
    with pytest.raises(OptionsError):
        EditProfile.from_json({"attention": {"peak": 1}})
    with pytest.raises(OptionsError):
        EditProfile(embedding=3.0)


# --- the projection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("scale", [0.35, 1.0, 1.6])
@pytest.mark.parametrize("axis", [0, -1])
def test_partial_projection_matches_the_formula(axis, scale, keep):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 40, generator=g)
    d = w.shape[axis]
    u = torch.randn(d, generator=g)
    u /= u.norm()
    want = reference(w, u, axis, scale, keep)
    got = w.clone()
    stats = project_out_(got, u, axis, scale=scale, preserve_norm=keep)
    assert (got.double() - want).abs().max() < 1e-5
    assert stats.relative_residual <= noise_floor(torch.float32, d)
    if keep:
        vectors_before = w.double().movedim(axis, -1).norm(dim=-1)
        vectors_after = got.double().movedim(axis, -1).norm(dim=-1)
        assert torch.allclose(vectors_before, vectors_after, rtol=1e-6)


def test_partial_projection_in_bf16_lands_within_rounding():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    u = torch.randn(64, generator=g)
    u /= u.norm()
    got = w.clone()
    stats = project_out_(got, u, 0, scale=0.6, preserve_norm=True)
    want = reference(w, u, 0, 0.6, True)
    assert (got.double() - want).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want.abs().max()
    assert stats.relative_residual <= noise_floor(torch.bfloat16, 64)


def test_streamed_columns_equal_in_memory_columns_for_a_shaped_edit():
    g = torch.Generator().manual_seed(5)
    d, m = 40, 24
    w = torch.randn(d, m, generator=g).to(torch.bfloat16)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    floor = noise_floor(torch.bfloat16, d)
    store = w.clone()

    def read(i0, i1, updated):
        return store[i0:i1].clone() if not updated else out[i0:i1].clone()

    out = w.clone()

    def write(i0, rows):
        out[i0 : i0 + rows.shape[0]] = rows

    streamed = project_columns_streamed(
        d, m, torch.bfloat16, u, floor, read=read, write=write, scale=0.7, preserve_norm=True, block_elems=96
    )
    in_memory = w.clone()
    reference_stats = project_columns_(in_memory, u, floor, scale=0.7, preserve_norm=True, block_elems=96)
    assert torch.equal(out, in_memory)
    assert streamed.residual_sq == reference_stats.residual_sq


# --- whole checkpoints --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_written_shaped_edit_equals_the_in_memory_one(family, tiny_checkpoints, tmp_path):
    """The streaming rewrite with a profile computes what the in-memory edit with it computes, in every family;
    writers with λ = 0 keep their bytes; the profile is recorded."""
    src = tiny_checkpoints(family)
    r = random_direction()
    profile = EditProfile(
        attention=LayerKernel(center=0.0, peak=0.8, width=1.0, floor=0.0),  # layer 1 of the 2 gets λ = 0
        mlp=LayerKernel(center=1.0, peak=1.2, width=2.0, floor=0.4),
        embedding=0.6,
        preserve_norm=family in {"llama", "gpt2", "gemma2"},
    )
    report = orthogonalize_checkpoint(src, tmp_path / "out", r, profile=profile, progress=False)
    assert report.provenance["options"]["edit_profile"] == profile.to_json()
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    in_memory = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    orthogonalize_model_(in_memory, r, profile=profile)
    ids = input_ids()
    with torch.inference_mode():
        got, want, before = edited(ids).logits, in_memory(ids).logits, original(ids).logits
    assert (got - before).abs().max() > 100 * TOLERANCE
    assert (got - want).abs().max().item() <= TOLERANCE

    spec = spec_for_config(original.config)
    inputs = load_tensors(src)
    tensors = load_tensors(tmp_path / "out")
    untouched = [
        name for name in inputs if (m := spec.match(name)) is not None and profile.weight(m.rule.group, m.layer) == 0
    ]
    assert untouched, "the profile must leave some writer at λ = 0 in this test"
    for name in untouched:
        assert torch.equal(tensors[name], inputs[name]), name


def test_full_profile_writes_the_same_bytes_as_the_plain_edit(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("qwen2")
    r = random_direction()
    orthogonalize_checkpoint(src, tmp_path / "plain", r, progress=False)
    orthogonalize_checkpoint(src, tmp_path / "full", r, profile=FULL_EDIT, progress=False)
    plain, full = raw_bytes(tmp_path / "plain"), raw_bytes(tmp_path / "full")
    assert plain and plain == full


def test_direction_file_carries_its_profile_into_the_edit(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints("llama")
    path = save_direction(Direction(vector=random_direction(), profile=SHAPED), tmp_path / "r.safetensors")
    loaded = load_direction(path)
    assert loaded.profile == SHAPED
    report = orthogonalize_checkpoint(src, tmp_path / "out", loaded, progress=False)
    assert EditProfile.from_json(report.provenance["options"]["edit_profile"]) == SHAPED
    explicit = orthogonalize_checkpoint(src, tmp_path / "full", loaded, profile=FULL_EDIT, progress=False)
    assert explicit.provenance["options"]["edit_profile"] == FULL_EDIT.to_json()
    shaped, full = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "full")
    assert any(not torch.equal(shaped[name], full[name]) for name in full if name in shaped)


def test_a_direction_file_with_a_broken_profile_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"direction": random_direction()}, str(path), metadata={"edit_profile": '{"embedding": 7}'})
    with pytest.raises(InvalidDirectionError, match="edit profile"):
        load_direction(path)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_temporary_edit_is_the_in_memory_edit_and_undoes_exactly(family, tiny_checkpoints):
    from weightedit.edit.in_memory import temporarily_edited, untie_embeddings_

    src = tiny_checkpoints(family)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    untie_embeddings_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    profile = EditProfile(mlp=LayerKernel(center=1, peak=0.7, width=1, floor=0.1), embedding=0.3, preserve_norm=True)
    orthogonalize_model_(reference_model, random_direction(), profile=profile)
    ids = input_ids()
    with torch.inference_mode():
        with temporarily_edited(model, random_direction(), profile):
            got = model(ids).logits
        want = reference_model(ids).logits
    assert torch.equal(got, want)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
