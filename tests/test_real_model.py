"""Real-architecture end-to-end: SmolLM2-135M-Instruct fetched through its recipe (GGUF from PyPI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.edit.direction_file import Direction, save_direction
from weightedit.runtime.hooks import ablate

from helpers import load_tensors, logit_tolerance

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a bicycle gear works.",
    "Give me three tips for learning a new language.",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The recipe's checkpoint, in a cache shared across runs when WEIGHTEDIT_CACHE is set by the user."""
    from weightedit.sources.recipes import fetch_recipe

    return fetch_recipe("smollm2-135m-instruct", progress=False).folder


def test_smollm2_edit_is_exact(smollm2, tmp_path):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(576, generator=g)
    r /= r.norm()
    direction = save_direction(Direction(vector=r), tmp_path / "r.safetensors")
    out = tmp_path / "edited"
    result = CliRunner().invoke(
        app, ["orthogonalize", "--model", str(smollm2), "--direction", str(direction), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    original = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert edited.config.tie_word_embeddings is False  # SmolLM2 ties; the default untie keeps the edit exact
    with torch.inference_mode():
        plain = original(**batch).logits
        with ablate(original, r):
            want = original(**batch).logits
        got = edited(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (want - got).abs()[mask].max().item()
    stored = {t.dtype for t in load_tensors(out).values() if t.is_floating_point()}
    tol = logit_tolerance(
        n_layers=edited.config.num_hidden_layers,
        weight_dtype=max(stored, key=lambda d: torch.finfo(d).eps),
        logit_scale=want.abs()[mask].max().item(),
    )
    assert diff <= tol, f"edited vs hook-ablated logits differ by {diff:.2e} (rounding bound {tol:.2e})"
    assert (plain - got).abs()[mask].max().item() > 1e-2  # the edit changed the model
    assert os.path.exists(out / "weightedit.json")


def test_demo_pipeline_end_to_end_on_smollm2(smollm2, tmp_path):
    """The README's main job, shrunk: fetch, English direction, edit, evaluate in two languages, rerun cached."""
    import json

    args = [
        "demo",
        "--recipe",
        "smollm2-135m-instruct",
        "--out",
        str(tmp_path / "demo"),
        "--langs",
        "en,de",
        "--n-train",
        "8",
        "--n-val",
        "4",
        "--limit",
        "4",
        "--generate",
        "2",
        "--max-new-tokens",
        "32",
        # SmolLM2 refuses nothing (test_smollm2_direction_with_defaults_never_ships_a_broken_model): the demo
        # runs its mechanics only when told to use a non-refusing language.
        "--allow-non-refusing",
        "--quiet",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert set(report["languages"]) == {"en", "de"}
    for lang in ("en", "de"):
        v = report["languages"][lang]
        assert v["edited"]["kl_mean"] is not None and v["perplexity_ratio"] > 0
        assert v["edited"]["n_generated"] == 2
    assert (tmp_path / "demo" / "refusal_direction.safetensors").exists()
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    demo = json.loads((tmp_path / "demo" / "report" / "demo.json").read_text())
    assert set(demo["reused"]) == {"direction", "edit", "baseline"}


def test_smollm2_direction_with_defaults_never_ships_a_broken_model(smollm2, tmp_path):
    """SmolLM2 answers harmful requests (it hardly refuses anything): with default settings `direction` must say
    so and exit 2, not pick a candidate whose edit breaks the model (layer 7, KL 8-11 nats, before)."""
    out = tmp_path / "r.safetensors"
    result = CliRunner().invoke(
        app, ["direction", "--model", str(smollm2), "--lang", "en", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 2, result.output
    assert "does not refuse in en" in " ".join(result.output.split())
    assert not out.exists()
