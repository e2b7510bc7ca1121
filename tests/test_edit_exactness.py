"""The edited checkpoint computes exactly what the original computes with r ablated from the residual stream."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.edit.arch import families
from weightedit.edit.direction_file import Direction, save_direction
from weightedit.runtime.hooks import ablate, ablate_as_edit, capture_residuals

from tiny_models import FAMILY_CONFIGS, POST_NORM, TIED, input_ids, random_direction

TOLERANCE = 1e-4  # max abs logit difference, float32 (docs/architecture.md, "Design bars")


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_registered_family_has_a_tiny_model():
    assert set(families()) <= set(FAMILY_CONFIGS), "add a tiny config for each new registry family"


def edit_with_cli(src, direction_file, out):
    """``weightedit orthogonalize`` on ``src``; the original and edited models, in float32."""
    result = run_cli("orthogonalize", "--model", src, "--direction", direction_file, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return original, edited


@pytest.fixture()
def direction_file(tmp_path):
    path = tmp_path / "r.safetensors"
    save_direction(Direction(vector=random_direction()), path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_orthogonalize_matches_ablation(family, tiny_checkpoints, direction_file, tmp_path):
    original, edited = edit_with_cli(tiny_checkpoints(family), direction_file, tmp_path / "edited")
    r = random_direction()
    ids = input_ids()
    if family in TIED:
        assert edited.config.tie_word_embeddings is False
        assert torch.equal(edited.get_output_embeddings().weight, original.get_input_embeddings().weight)

    with torch.inference_mode():
        if family not in POST_NORM:
            with ablate(original, r):
                want = original(ids).logits
            got = edited(ids).logits
            # The edit must matter: without the hooks the original differs.
            assert (original(ids).logits - got).abs().max() > 100 * TOLERANCE
            assert (want - got).abs().max().item() <= TOLERANCE
        else:
            # Post-norm blocks renormalize each writer's output, so the edited model is not the hooked
            # original; what holds exactly is that nothing is ever written along r.
            store: dict[int, torch.Tensor] = {}
            with capture_residuals(edited, store):
                edited(ids)
            for layer, h in store.items():
                rel = (h @ r).abs().max() / h.norm(dim=-1).max()
                assert rel.item() < 1e-5, f"layer {layer}: residual keeps a component {rel.item():.2e} along r"
            before: dict[int, torch.Tensor] = {}
            with capture_residuals(original, before):
                original(ids)
            assert max(((h @ r).abs().max() / h.norm(dim=-1).max()).item() for h in before.values()) > 1e-2


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_selection_intervention_matches_the_edited_checkpoint(family, tiny_checkpoints, direction_file, tmp_path):
    """What selection scores (ablate_as_edit on the original) is what the written checkpoint computes, in every
    family: post-norm blocks (writers projected against γ ⊙ r), MoE expert stacks, learned positions, tied heads."""
    original, edited = edit_with_cli(tiny_checkpoints(family), direction_file, tmp_path / "edited")
    r = random_direction()
    ids = input_ids()
    with torch.inference_mode():
        with ablate_as_edit(original, r):
            want = original(ids).logits
        got = edited(ids).logits
        assert (original(ids).logits - got).abs().max() > 100 * TOLERANCE
    assert (want - got).abs().max().item() <= TOLERANCE
