"""The defended-model builder of `bench/defended_model.py`, on the planted tiny model.

The planted model refuses (its first token is REFUSE) exactly when the residual stream carries r_true, so
ablating r_true removes every refusal. After the builder's LoRA training under ablation, the model must keep
refusing harmful prompts with r_true ablated and keep answering harmless ones: a defence that holds against the
single-direction attack by construction. Training without ablation (ablate_prob=0) must not get there, which is
what shows the ablation during training is what builds the defence.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from weightedit.runtime.modeling import load_model
from weightedit.runtime.options import ModelLoadOptions

from tiny_models import make_planted_model, planted_prompts, random_direction

_PATH = Path(__file__).resolve().parent.parent / "bench" / "defended_model.py"
_spec = importlib.util.spec_from_file_location("defended_model", _PATH)
assert _spec is not None and _spec.loader is not None
builder = importlib.util.module_from_spec(_spec)
sys.modules["defended_model"] = builder
_spec.loader.exec_module(builder)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def is_refusal(text: str, lang: str) -> bool:
    return text.startswith("REFUSE")


def _setup(tmp_path: Path):
    r = random_direction()
    loaded = load_model(make_planted_model(tmp_path / "planted", r), ModelLoadOptions(dtype="float32"), progress=False)
    harmful = [("en", t) for t in planted_prompts(32, True, 11)]
    harmless = [("en", t) for t in planted_prompts(32, False, 12)]
    check_bad = [("en", t) for t in planted_prompts(16, True, 21)]
    check_good = [("en", t) for t in planted_prompts(16, False, 22)]
    return r, loaded, harmful, harmless, check_bad, check_good


def _train(loaded, harmful, harmless, ablate_prob: float):
    directions = builder.layer_directions(loaded, [t for _, t in harmful], [t for _, t in harmless], 8)
    examples, counts = builder.make_examples(
        loaded, harmful, harmless, is_refusal=is_refusal, target_tokens=2, batch_size=8
    )
    merged, record = builder.train_defence(
        loaded, examples, directions, steps=80, batch_size=16, rank=4, lr=2e-3, ablate_prob=ablate_prob,
        target_modules=LORA_TARGETS, seed=0,
    )  # fmt: skip
    loaded.model = merged
    return directions, counts, record


def _refusals(loaded, pairs, direction):
    return builder.judged_refusal(loaded, pairs, is_refusal, direction=direction, max_new_tokens=1, batch_size=8)[0]


def test_defence_training_makes_refusal_survive_ablation(tmp_path: Path) -> None:
    r, loaded, harmful, harmless, check_bad, check_good = _setup(tmp_path)
    # The base model: refuses the held-out harmful prompts, and none once r_true is ablated.
    assert _refusals(loaded, check_bad, None) >= 15
    assert _refusals(loaded, check_bad, r) <= 1
    directions, counts, record = _train(loaded, harmful, harmless, ablate_prob=0.75)
    # The per-layer directions of the builder find the planted one after layer 0.
    assert float(torch.nn.functional.cosine_similarity(directions[2], r / r.norm(), dim=0)) > 0.9
    assert counts["harmful_refused"] >= 30 and record.ablated.count(True) > 40
    assert _refusals(loaded, check_bad, r) >= 13  # refusal survives the single-direction attack
    assert _refusals(loaded, check_bad, None) >= 15
    assert _refusals(loaded, check_good, None) <= 1  # harmless prompts are still answered


def test_without_ablation_training_builds_no_defence(tmp_path: Path) -> None:
    r, loaded, harmful, harmless, check_bad, _ = _setup(tmp_path)
    _train(loaded, harmful, harmless, ablate_prob=0.0)
    assert _refusals(loaded, check_bad, r) <= 2
