"""The weight-delta strip of verify-defence (weightedit.edit.delta)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightedit.edit.arch import spec_for_config
from weightedit.edit.delta import strip_delta
from weightedit.errors import InvalidCheckpointError

from helpers import load_tensors
from tiny_models import make_model, save_model


@pytest.fixture()
def pair(tmp_path):
    """A tiny llama and a "fine-tune" of it whose writers changed by a rank-2 delta (other tensors changed too)."""
    base = save_model(make_model("llama"), tmp_path / "base")
    tuned = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    spec = spec_for_config(tuned.config)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2 and spec.match(name) is not None:
                a, b = torch.randn(param.shape[0], 2, generator=g), torch.randn(2, param.shape[1], generator=g)
                param += 0.1 * a @ b
            elif name.endswith("q_proj.weight"):
                param += 0.01  # not a writer: the strip leaves it
    return base, save_model(tuned, tmp_path / "tuned")


def test_a_strip_covering_the_change_gives_back_the_base_writers(pair, tmp_path):
    base, tuned = pair
    removed = strip_delta(tuned, base, tmp_path / "stripped", rank=2)
    assert removed and all(share == pytest.approx(1.0, abs=1e-6) for share in removed.values())
    got, want, before = load_tensors(tmp_path / "stripped"), load_tensors(base), load_tensors(tuned)
    assert set(got) == set(want)
    for name in removed:
        assert (got[name] - want[name]).abs().max() < 1e-5, name
    q = next(n for n in got if n.endswith("q_proj.weight"))
    assert torch.equal(got[q], before[q])  # non-writers are copied from the defended model


def test_a_lower_rank_strip_removes_part_of_the_change(pair, tmp_path):
    base, tuned = pair
    removed = strip_delta(tuned, base, tmp_path / "stripped", rank=1)
    assert all(0.3 < share < 1.0 for share in removed.values())


def test_a_base_of_another_shape_is_refused(pair, tmp_path):
    _, tuned = pair
    other = save_model(make_model("llama", hidden_size=32, head_dim=8), tmp_path / "other")
    with pytest.raises(InvalidCheckpointError, match="trained from"):
        strip_delta(tuned, other, tmp_path / "stripped", rank=2)
    assert not (tmp_path / "stripped").exists()
