"""Model cards for edited checkpoints, built with huggingface_hub's ``ModelCard``/``ModelCardData``.

The card is rendered from ``MODEL_CARDS/weightedit.md`` (installed as ``weightedit._model_cards``): YAML
front matter (base model and relation, license inherited from the input, languages, tags, pipeline), what
was edited, the evaluation table from ``report.json`` when there is one, embedded plots, provenance, and an
intended-use and risk section.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .errors import WeighteditError
from .prompts import LANGUAGE_NAMES

__all__ = ["CardInputs", "build_card", "write_card", "find_report", "REPORT_DIR_IN_MODEL"]

REPORT_DIR_IN_MODEL = "weightedit-report"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardInputs:
    """Everything the card says, gathered from the model folder (and a report)."""

    folder: Path
    provenance: dict[str, Any]
    report: dict[str, Any] | None = None
    report_dir: Path | None = None
    plots: list[Path] = field(default_factory=list)


def find_report(folder: Path, report: Path | None = None) -> tuple[dict[str, Any] | None, Path | None]:
    """``report.json`` from ``report`` (file or folder), else from the model folder's report copy."""
    candidates = []
    if report is not None:
        candidates.append(report if report.suffix == ".json" else report / "report.json")
    candidates += [folder / REPORT_DIR_IN_MODEL / "report.json", folder / "report.json"]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")), path.parent
            except ValueError as e:
                raise WeighteditError(f"{path} is not valid JSON ({e}): re-run weightedit evaluate") from None
    if report is not None:
        raise WeighteditError(f"no report.json at {report}: pass the folder written by weightedit evaluate")
    return None, None


def _inputs(folder: Path, report: Path | None) -> CardInputs:
    provenance_path = folder / "weightedit.json"
    if not provenance_path.is_file():
        raise WeighteditError(
            f"{folder} has no weightedit.json: model cards describe checkpoints written by weightedit orthogonalize"
        )
    provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
    data, report_dir = find_report(folder, report)
    plots = sorted(report_dir.glob("*.png")) if report_dir else []
    return CardInputs(folder=folder, provenance=provenance, report=data, report_dir=report_dir, plots=plots)


def _base_model(provenance: dict[str, Any]) -> str | None:
    source = provenance.get("source", {})
    for key in ("hub_id", "model"):
        value = source.get(key)
        if isinstance(value, str) and _HUB_ID.match(value) and not value.startswith(("/", ".")):
            return value
    return None


def _eval_table(report: dict[str, Any]) -> str:
    from .evaluation.report import primary_refusal

    rows = [
        "| language | refusal before | refusal after | KL | perplexity ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for lang, v in report.get("languages", {}).items():
        b = v.get("baseline") or {}
        e = v["edited"]

        def pct(x: float | None) -> str:
            return "—" if x is None else f"{100 * x:.0f}%"

        def num(x: float | None) -> str:
            return "—" if x is None else f"{x:.3f}"

        rows.append(
            f"| {LANGUAGE_NAMES.get(lang, lang)} ({lang}) | {pct(primary_refusal(b) if b else None)} | "
            f"{pct(primary_refusal(e))} | {num(e.get('kl_mean'))} | {num(v.get('perplexity_ratio'))} |"
        )
    judged = any(v["edited"].get("refusal_rate_judge") is not None for v in report.get("languages", {}).values())
    how = "judged from greedy generations" if judged else "first-token refusal score > 0"
    return (
        "\n".join(rows)
        + f"\n\nRefusal: share of harmful prompts refused ({how}); KL and perplexity ratio against the base model."
    )


def build_card(folder: Path, *, repo_id: str | None = None, report: Path | None = None):
    """A ``huggingface_hub.ModelCard`` for the edited checkpoint in ``folder``."""
    from huggingface_hub import ModelCard, ModelCardData

    inputs = _inputs(Path(folder), report)
    p = inputs.provenance
    direction = p.get("direction", {})
    source = p.get("source", {})
    langs = list(direction.get("languages") or [])
    if inputs.report:
        langs = list(dict.fromkeys(langs + list(inputs.report.get("languages", {}))))
    base = _base_model(p)
    card_data = ModelCardData(
        base_model=base,
        license=source.get("license") or "other",
        language=langs or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["weightedit", "refusal-direction", "orthogonalization", "safety-research"],
        model_name=repo_id.split("/")[-1] if repo_id else None,
    )
    if base:
        card_data.base_model_relation = "finetune"
    groups = ", ".join(f"{k} ({v})" for k, v in p.get("edited_groups", {}).items())
    template = (resources.files("weightedit._model_cards") / "weightedit.md").read_text(encoding="utf-8")
    plots = [f"{REPORT_DIR_IN_MODEL}/{path.name}" for path in inputs.plots]
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=repo_id or Path(folder).name,
        base_model=base or source.get("model") or "the input model",
        direction_languages=", ".join(f"{LANGUAGE_NAMES.get(x, x)} ({x})" for x in direction.get("languages") or [])
        or "a direction file",
        layer=direction.get("layer"),
        position=direction.get("position"),
        edited_groups=groups,
        tied=(p.get("options") or {}).get("tied_embeddings"),
        eval_table=_eval_table(inputs.report) if inputs.report else None,
        plots=plots,
        weightedit_version=p.get("weightedit_version", __version__),
        card_version=__version__,
        source_kind=source.get("kind"),
        source_model=source.get("model"),
        source_revision=source.get("revision") or "(not recorded)",
        direction_sha=direction.get("sha256"),
        model_type=p.get("model_type"),
        verification=p.get("verification", {}),
    )


def write_card(folder: Path, *, repo_id: str | None = None, report: Path | None = None) -> Path:
    """Write ``README.md`` (and the report's plots under ``weightedit-report/``) into the model folder."""
    folder = Path(folder)
    card = build_card(folder, repo_id=repo_id, report=report)
    inputs = _inputs(folder, report)
    if inputs.report_dir and inputs.report_dir.resolve() != (folder / REPORT_DIR_IN_MODEL).resolve():
        dest = folder / REPORT_DIR_IN_MODEL
        dest.mkdir(exist_ok=True)
        for path in [*inputs.plots, inputs.report_dir / "report.json", inputs.report_dir / "report.md"]:
            if path.is_file():
                shutil.copy2(path, dest / path.name)
    path = folder / "README.md"
    card.save(path)
    return path
