"""The model card says what was measured, and only that."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from weightedit.card import build_card
from weightedit.cli.main import app
from weightedit.edit.direction_file import Direction
from weightedit.edit.rewrite import orthogonalize_checkpoint

from report_fixtures import write_synthetic_report
from tiny_models import random_direction

RECIPE_SOURCE = {
    "model": "recipe:smollm2-135m-instruct",
    "kind": "recipe",
    "revision": None,
    "recipe": "smollm2-135m-instruct",
    "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "mirror_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "license": "apache-2.0",
}


@pytest.fixture(scope="module")
def edited(tiny_checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    direction = Direction(vector=random_direction(), layer=1, position=-1, languages=("en",))
    return orthogonalize_checkpoint(tiny_checkpoints("llama"), root / "edited", direction, progress=False).out


@pytest.fixture()
def model(edited, tmp_path) -> Path:
    return Path(shutil.copytree(edited, tmp_path / "m"))


def card_text(model: Path, report: Path | None = None) -> str:
    return str(build_card(model, report=report))


def front(text: str) -> dict:
    return yaml.safe_load(text.split("---", 2)[1])


def test_without_a_report_nothing_is_claimed(model):
    text = card_text(model)
    assert "Nothing was measured" in text
    body = text.split("## Evaluation", 1)[1].split("## Provenance", 1)[0]
    assert "%" not in body and "KL" not in body
    assert "little loss" not in text and "stop refusing" not in text
    assert str(model.parent) not in text  # no local paths


def test_every_effect_sentence_comes_from_the_report(model, tmp_path):
    report = write_synthetic_report(tmp_path / "r", {"en": (9, 0, 0.05, 1.02), "ja": (7, 3, 0.08, 1.04)}, n=12)
    text = card_text(model, report)
    assert "Pooled over all languages, refusal went from 16/24 (67%, 95% CI 47–82%)" in text
    assert "to 3/24 (12%, 4–31%) after it" in text
    assert "Met in en (75% → 0%); **not met** in ja (58% → 25%)." in text
    assert "Refusal was still observed after the edit in ja (25% [9–53%] (3/12))." in text
    assert "No refusal was observed after the edit in en" in text and "up to 24%" in text
    assert "stayed within the design bar (≤ 0.1)" in text and "largest 0.080 (ja)" in text
    assert "at most 1.040 (ja)" in text
    assert "| English (en) | 12 | 75% [47–91%] (9/12) | 0% [0–24%] (0/12) |" in text


def test_a_huge_kl_is_not_called_a_small_capability_loss(model, tmp_path):
    report = write_synthetic_report(tmp_path / "r", {"en": (8, 0, 2.5, 1.8), "de": (8, 0, 0.05, 1.01)}, n=8)
    text = card_text(model, report)
    assert "little loss" not in text and "within the design bar (≤ 0.1)" not in text
    assert "exceeds the design bar (≤ 0.1) in en (2.500)" in text and "expect a loss of capability" in text
    assert "rose beyond the design bar (ratio ≤ 1.1) in en (1.800)" in text


def test_language_license_and_base_model_come_from_the_recipe(tiny_checkpoints, tmp_path):
    direction = Direction(vector=random_direction(), layer=1, position=-1, languages=("en", "de", "zh"))
    out = orthogonalize_checkpoint(
        tiny_checkpoints("llama"), tmp_path / "e", direction, progress=False, extra_provenance={"source": RECIPE_SOURCE}
    ).out
    report = write_synthetic_report(tmp_path / "r", {"en": (8, 0, 0.01, 1.0), "de": (2, 0, 0.01, 1.0)}, n=8)
    meta = front(card_text(out, report))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["language"] == ["en"]  # the base model's language, not the direction's or the evaluated ones
    assert "recipe:smollm2-135m-instruct" in card_text(out)


def test_selection_fallback_is_stated(model, tmp_path):
    record = json.loads((model / "weightedit.json").read_text())
    record["direction"]["selection"] = {"note": "no candidate passed the KL/induce filters; the lowest bypass was kept"}
    (model / "weightedit.json").write_text(json.dumps(record))
    report = write_synthetic_report(tmp_path / "r", {"en": (8, 0, 0.01, 1.0)}, n=8)
    assert "Direction selection: no candidate passed the KL/induce filters" in card_text(model, report)


def test_a_local_base_model_path_is_not_shown(model, tmp_path):
    record = json.loads((model / "weightedit.json").read_text())
    record["source"] = {"model": "/home/someone/models/my-base", "kind": "local", "license": "mit"}
    (model / "weightedit.json").write_text(json.dumps(record))
    report = write_synthetic_report(tmp_path / "r", {"en": (8, 0, 0.01, 1.0)}, n=8, edited_id="/tmp/x/edited")
    text = card_text(model, report)
    assert "/home/someone" not in text and "my-base" in text


@pytest.mark.parametrize(
    ("target", "content", "message"),
    [
        ("weightedit.json", "{not json", "weightedit.json is not valid JSON"),
        ("weightedit.json", "[1, 2]", "holds a JSON list, not an object"),
        ("report.json", "{not json", "report.json is not valid JSON"),
        ("report.json", '{"schema": "other/1"}', "is not a weightedit evaluation report"),
        ("report.json", '{"schema": "weightedit.evaluate/2", "languages": {}}', "has no languages"),
    ],
)
def test_card_on_malformed_files_is_a_one_line_error(model, tmp_path, target, content, message):
    report = write_synthetic_report(tmp_path / "r", {"en": (8, 0, 0.01, 1.0)}, n=8)
    (model if target == "weightedit.json" else report).joinpath(target).write_text(content)
    result = CliRunner().invoke(app, ["card", "--model", str(model), "--report", str(report)])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1
    assert not (model / "README.md").exists()


def test_a_failed_card_write_leaves_the_previous_card(model, monkeypatch):
    """README.md is replaced in one rename: a write that fails (here: the disk fills at the rename) keeps the
    previous card byte for byte, and leaves no temporary file beside it."""
    import errno
    import os

    from weightedit.card import write_card
    from weightedit.errors import WriteFailedError
    from weightedit.io import atomic

    previous = "---\nlicense: apache-2.0\n---\n# the card before\n"
    (model / "README.md").write_text(previous, encoding="utf-8")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(WriteFailedError):
        write_card(model)
    assert (model / "README.md").read_text(encoding="utf-8") == previous
    assert not [p.name for p in model.iterdir() if "weightedit-tmp" in p.name]
    monkeypatch.undo()
    write_card(model)
    assert (model / "README.md").read_text(encoding="utf-8") != previous


def test_a_per_layer_direction_is_described_as_such(tiny_checkpoints, tmp_path):
    import torch

    layers = torch.stack([random_direction(seed=20 + i) for i in range(2)])
    direction = Direction(vector=layers[0], layer_vectors=layers, layer=1, position=-1, languages=("en",))
    out = orthogonalize_checkpoint(tiny_checkpoints("llama"), tmp_path / "m", direction, progress=False).out
    text = card_text(out)
    assert "one direction per decoder layer (2 rows), post-instruction position -1." in text
    assert "residual stream at layer" not in text
    assert "residual stream at layer 1, post-instruction position -1" in card_text(
        orthogonalize_checkpoint(
            tiny_checkpoints("llama"), tmp_path / "g", Direction(vector=layers[0], layer=1, position=-1), progress=False
        ).out
    )
    unplaced = Direction(vector=layers[0], layer_vectors=layers)  # a file that does not say where it was read
    text = card_text(orthogonalize_checkpoint(tiny_checkpoints("llama"), tmp_path / "u", unplaced, progress=False).out)
    assert "one direction per decoder layer (2 rows)." in text and "position None" not in text
