"""Model cards for edited checkpoints, built with huggingface_hub's ``ModelCard``/``ModelCardData``.

The card is rendered from ``render/card_templates/weightedit.md`` (package data). Its rule
is that nothing in it claims an effect that was not measured: every sentence about refusal, KL or perplexity
is generated here from ``report.json`` (with n, intervals and which design bars were met and which not), and
a card without a report says that nothing was measured. Its front matter takes ``base_model`` (the Hub id,
also for recipe and GGUF-converted inputs), ``license`` and ``language`` from the base model (its recipe or
card), not from the evaluated languages. The card shows no local absolute paths.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .errors import WeighteditError
from .evaluation.report import BAR_KL, BAR_PPL, BAR_REDUCTION, BAR_REFUSING, display_name, fmt_rate
from .evaluation.stats import wilson_interval
from .io.atomic import atomic_file, write_text_atomic
from .prompts import LANGUAGE_NAMES
from .render.format import percent
from .sources import card_front_matter
from .sources.model import is_hub_id
from .sources.recipes import get_recipe

__all__ = ["CardInputs", "CardError", "build_card", "write_card", "find_report", "findings", "REPORT_DIR_IN_MODEL"]

REPORT_DIR_IN_MODEL = "weightedit-report"


class CardError(WeighteditError, ValueError):
    """weightedit.json or report.json cannot be read as what weightedit writes."""


@dataclass
class CardInputs:
    """Everything the card says, gathered from the model folder (and a report)."""

    folder: Path
    provenance: dict[str, Any]
    report: dict[str, Any] | None = None
    report_dir: Path | None = None
    plots: list[Path] = field(default_factory=list)


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"cannot read {path} ({e}): {fix}", path=path) from None
    except ValueError as e:
        raise CardError(f"{path} is not valid JSON ({str(e).split(':')[0]}): {fix}", path=path) from None
    if not isinstance(data, dict):
        raise CardError(f"{path} is not a {what} (expected a JSON object): {fix}", path=path)
    return data


def _check_report(data: dict[str, Any], path: Path) -> dict[str, Any]:
    fix = "re-run weightedit evaluate to write it again"
    schema = data.get("schema")
    if not isinstance(schema, str) or not schema.startswith("weightedit.evaluate/"):
        raise CardError(f"{path} is not a weightedit evaluation report (schema {schema!r}): {fix}", path=path)
    languages = data.get("languages")
    if not isinstance(languages, dict) or not languages:
        raise CardError(f"{path} has no languages: {fix}", path=path)
    for lang, v in languages.items():
        if not isinstance(v, dict) or not isinstance(v.get("edited"), dict):
            raise CardError(f"{path}: language {lang!r} has no 'edited' measurements: {fix}", path=path)
    if not isinstance(data.get("summary", {}), dict) or not isinstance(data.get("models", {}), dict):
        raise CardError(f"{path} has a malformed summary or models field: {fix}", path=path)
    return data


def find_report(folder: Path, report: Path | None = None) -> tuple[dict[str, Any] | None, Path | None]:
    """``report.json`` from ``report`` (file or folder), else from the model folder's report copy."""
    candidates = []
    if report is not None:
        candidates.append(report if report.suffix == ".json" else report / "report.json")
    candidates += [folder / REPORT_DIR_IN_MODEL / "report.json", folder / "report.json"]
    for path in candidates:
        if path.is_file():
            data = _read_json(path, "weightedit evaluation report", "re-run weightedit evaluate")
            return _check_report(data, path), path.parent
    if report is not None:
        raise CardError(
            f"no report.json at {report}: pass the folder written by weightedit evaluate",
            path=report,
            option="report",
            value=report,
        )
    return None, None


def _inputs(folder: Path, report: Path | None) -> CardInputs:
    provenance_path = folder / "weightedit.json"
    if not provenance_path.is_file():
        raise CardError(
            f"{folder} has no weightedit.json: model cards describe checkpoints written by weightedit orthogonalize",
            path=folder,
        )
    fix = "it should be the record written by weightedit orthogonalize; re-run the edit"
    provenance = _read_json(provenance_path, "weightedit provenance record", fix)
    for key in ("source", "direction"):
        if not isinstance(provenance.get(key, {}), dict):
            raise CardError(f"{provenance_path}: field {key!r} is malformed: {fix}", path=provenance_path)
    data, report_dir = find_report(folder, report)
    plots = sorted(report_dir.glob("*.png")) if report_dir else []
    return CardInputs(folder=folder, provenance=provenance, report=data, report_dir=report_dir, plots=plots)


# ---------------------------------------------------------------------------------------------------------
# Base model: Hub id, license, languages
# ---------------------------------------------------------------------------------------------------------


def _recipe_data(name: str | None) -> dict[str, Any]:
    if not name:
        return {}
    try:
        recipe = get_recipe(name)
    except (WeighteditError, KeyError):
        return {}
    try:
        return yaml.safe_load(Path(recipe.path).read_text(encoding="utf-8")) or {} if recipe.path else {}
    except (OSError, yaml.YAMLError):
        return {}


def _base_model(provenance: dict[str, Any]) -> str | None:
    source = provenance.get("source") or {}
    for key in ("hub_id", "model"):
        value = source.get(key)
        if isinstance(value, str) and is_hub_id(value):
            return value
    return None


def _base_languages(provenance: dict[str, Any]) -> list[str] | None:
    """The base model's languages: recorded in the provenance, from its recipe, or from its own model card."""
    source = provenance.get("source") or {}
    for value in (source.get("language"), _recipe_data(source.get("recipe")).get("language")):
        if value:
            return [value] if isinstance(value, str) else [str(x) for x in value]
    model = source.get("model")
    if isinstance(model, str) and source.get("kind") == "local" and Path(model).is_dir():
        value = card_front_matter(Path(model)).get("language")
        if value:
            return [value] if isinstance(value, str) else [str(x) for x in value]
    return None


def _display(value: Any) -> str:
    """A model reference for the card: Hub ids and recipes as given, local paths by their last part."""
    return display_name(str(value)) if value is not None else "(not recorded)"


# ---------------------------------------------------------------------------------------------------------
# What the report says, as sentences
# ---------------------------------------------------------------------------------------------------------


def _metrics_v2(m: dict[str, Any]) -> dict[str, Any]:
    """The headline refusal fields of a metrics block; version-1 reports get them derived from rate × n."""
    if "refusal_rate" in m:
        return m
    judged = m.get("refusal_rate_judge")
    rate = judged if judged is not None else m.get("refusal_rate_score")
    n = m.get("n_generated") if judged is not None else m.get("n_harmful")
    out = dict(m)
    if rate is not None and n:
        k = round(rate * n)
        ci = wilson_interval(k, n)
        out.update(refusal_rate=rate, refusal_k=k, refusal_n=n, refusal_ci=list(ci) if ci else None)
    else:
        out.update(refusal_rate=rate, refusal_k=None, refusal_n=n, refusal_ci=None)
    out["refusal_method"] = "judge" if judged is not None else "score"
    return out


def _num(x: float | None, ci: list[float] | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _eval_table(report: dict[str, Any]) -> str:
    rows = [
        "| language | n | refusal before | refusal after | McNemar p | KL [95% CI] | perplexity ratio [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lang, v in report["languages"].items():
        e = _metrics_v2(v["edited"])
        b = _metrics_v2(v["baseline"]) if v.get("baseline") else {}
        test = v.get("refusal_mcnemar")
        p = "—" if not test else (f"{test['p_value']:.2g}" if test["p_value"] >= 0.001 else "<0.001")
        rows.append(
            f"| {LANGUAGE_NAMES.get(lang, lang)} ({lang}) | {e.get('refusal_n') or '—'} | {fmt_rate(b) if b else '—'} | "
            f"{fmt_rate(e)} | {p} | {_num(e.get('kl_mean'), e.get('kl_ci'))} | "
            f"{_num(v.get('perplexity_ratio'), v.get('perplexity_ratio_ci'))} |"
        )
    return "\n".join(rows)


def findings(report: dict[str, Any], provenance: dict[str, Any] | None = None) -> list[str]:
    """The card's statements about effects, each generated from a number in ``report`` (and the
    selection record in ``provenance``)."""
    out: list[str] = []
    langs = report["languages"]
    has_base = any(v.get("baseline") for v in langs.values())
    first = _metrics_v2(next(iter(langs.values()))["edited"])
    judge = report.get("judge") or {}
    method = (
        f"the share of greedy generations judged refusals by the {judge.get('name') or report.get('options', {}).get('judge')} judge"
        if first.get("refusal_method") == "judge"
        else "the share of harmful prompts whose first-token refusal score is positive (no generations were judged)"
    )
    split = report.get("split") or report.get("options", {}).get("split") or "(not recorded)"
    ns = sorted({n for v in langs.values() if (n := _metrics_v2(v["edited"]).get("refusal_n")) is not None})
    out.append(
        f"Measured on the **{split}** split with {'/'.join(map(str, ns)) or 'an unknown number of'} harmful prompts per "
        f"language in {len(langs)} languages; refusal is {method}. Intervals are 95% (Wilson for rates, bootstrap for KL "
        "and perplexity ratios)."
    )
    if first.get("refusal_method") == "judge" and judge.get("accuracy") is not None:
        out.append(
            f"The judge agreed with {judge['n']} held-out labelled responses {100 * judge['accuracy']:.0f}% of the time "
            f"(precision {judge['precision']:.2f}, recall {judge['recall']:.2f}), so judged rates carry that error too."
        )
    if not has_base:
        out.append("No baseline was evaluated, so nothing can be said about what the edit changed.")
        return out
    k_b = sum(_metrics_v2(v["baseline"]).get("refusal_k") or 0 for v in langs.values())
    k_e = sum(_metrics_v2(v["edited"]).get("refusal_k") or 0 for v in langs.values())
    n_all = sum(_metrics_v2(v["edited"]).get("refusal_n") or 0 for v in langs.values())
    cb, ce = wilson_interval(k_b, n_all), wilson_interval(k_e, n_all)
    if cb is not None and ce is not None:
        out.append(
            f"Pooled over all languages, refusal went from {k_b}/{n_all} ({percent(k_b / n_all)}, 95% CI "
            f"{100 * cb[0]:.0f}–{100 * cb[1]:.0f}%) before the edit to {k_e}/{n_all} ({percent(k_e / n_all)}, "
            f"{100 * ce[0]:.0f}–{100 * ce[1]:.0f}%) after it."
        )
    refusing: list[str] = []
    met: list[str] = []
    missed: list[str] = []
    for lang, v in langs.items():
        b, e = _metrics_v2(v["baseline"]), _metrics_v2(v["edited"])
        if b.get("refusal_rate") is None or e.get("refusal_rate") is None or b["refusal_rate"] < BAR_REFUSING:
            continue
        refusing.append(lang)
        cut = (b["refusal_rate"] - e["refusal_rate"]) / b["refusal_rate"]
        (met if cut >= BAR_REDUCTION else missed).append(
            f"{lang} ({percent(b['refusal_rate'])} → {percent(e['refusal_rate'])})"
        )
    bar = f"cut refusal by ≥ {100 * BAR_REDUCTION:.0f}% (relative) wherever the base model refuses ≥ {100 * BAR_REFUSING:.0f}%"
    if not refusing:
        out.append(
            f"No language refused ≥ {100 * BAR_REFUSING:.0f}% before the edit, so the bar to {bar} was not tested."
        )
    else:
        text = f"Design bar: {bar}. Met in {', '.join(met) or 'no language'}"
        text += f"; **not met** in {', '.join(missed)}." if missed else "."
        out.append(text)
    remaining = [
        f"{lang} ({fmt_rate(_metrics_v2(v['edited']))})"
        for lang, v in langs.items()
        if (_metrics_v2(v["edited"]).get("refusal_rate") or 0) > 0
    ]
    if remaining:
        out.append(f"Refusal was still observed after the edit in {', '.join(remaining)}.")
    zero = [lang for lang, v in langs.items() if _metrics_v2(v["edited"]).get("refusal_rate") == 0]
    if zero:
        hi = max((_metrics_v2(langs[lang]["edited"]).get("refusal_ci") or [0, 0])[1] for lang in zero)
        out.append(
            f"No refusal was observed after the edit in {', '.join(zero)}; with these sample sizes that is compatible "
            f"with a true rate of up to {percent(hi)}."
        )
    kls = {lang: v["edited"].get("kl_mean") for lang, v in langs.items() if v["edited"].get("kl_mean") is not None}
    if kls:
        worst = max(kls, key=lambda x: kls[x])
        if kls[worst] <= BAR_KL:
            out.append(
                f"KL divergence from the base model on harmless prompts stayed within the design bar (≤ {BAR_KL}) in every "
                f"language: mean {sum(kls.values()) / len(kls):.3f}, largest {kls[worst]:.3f} ({worst})."
            )
        else:
            over = [f"{lang} ({x:.3f})" for lang, x in kls.items() if x > BAR_KL]
            out.append(
                f"KL divergence from the base model on harmless prompts exceeds the design bar (≤ {BAR_KL}) in "
                f"{', '.join(over)}: the edit changed the model's next-token predictions substantially there, so expect "
                "a loss of capability; do not rely on this model without measuring what you need."
            )
    else:
        out.append("KL divergence to the base model was not measured.")
    ratios = {lang: v.get("perplexity_ratio") for lang, v in langs.items() if v.get("perplexity_ratio")}
    if ratios:
        worst = max(ratios, key=lambda x: ratios[x])
        if ratios[worst] <= BAR_PPL:
            out.append(
                f"Perplexity on parallel sentences changed by a factor of at most {ratios[worst]:.3f} ({worst}), within the "
                f"design bar (≤ {BAR_PPL})."
            )
        else:
            over = [f"{lang} ({x:.3f})" for lang, x in ratios.items() if x > BAR_PPL]
            out.append(
                f"Perplexity on parallel sentences rose beyond the design bar (ratio ≤ {BAR_PPL}) in {', '.join(over)}: "
                "the edit degraded language modelling there."
            )
    else:
        out.append("Perplexity was not measured.")
    mgsm = {
        lang: (v["baseline"].get("mgsm_accuracy"), v["edited"].get("mgsm_accuracy"))
        for lang, v in langs.items()
        if v["edited"].get("mgsm_accuracy") is not None
    }
    if mgsm:
        out.append(
            "MGSM accuracy before → after: "
            + ", ".join(f"{lang} {percent(b)} → {percent(e)}" for lang, (b, e) in mgsm.items())
            + f" (n = {next(iter(langs.values()))['edited'].get('n_mgsm', '?')} per language)."
        )
    selection = ((provenance or {}).get("direction") or {}).get("selection") or {}
    if isinstance(selection, dict) and selection.get("note"):
        out.append(f"Direction selection: {selection['note']}.")
    elif isinstance(selection, dict) and selection.get("passes_filters") is False:
        out.append("Direction selection: the chosen candidate did not pass the KL/induce filters.")
    return out


def build_card(folder: Path, *, repo_id: str | None = None, report: Path | None = None):
    """A ``huggingface_hub.ModelCard`` for the edited checkpoint in ``folder``."""
    inputs = _inputs(Path(folder), report)
    p = inputs.provenance
    direction = p.get("direction") or {}
    source = p.get("source") or {}
    base = _base_model(p)
    card_data = ModelCardData(
        base_model=base,
        license=source.get("license") or "other",
        language=_base_languages(p),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["weightedit", "refusal-direction", "orthogonalization", "safety-research"],
        model_name=repo_id.split("/")[-1] if repo_id else None,
        base_model_relation="finetune" if base else None,
    )
    groups = ", ".join(f"{k} ({v})" for k, v in (p.get("edited_groups") or {}).items())
    template = (resources.files("weightedit.render") / "card_templates" / "weightedit.md").read_text(encoding="utf-8")
    plots = [f"{REPORT_DIR_IN_MODEL}/{path.name}" for path in inputs.plots]
    base_name = base or (_display(source.get("model")) if source.get("model") else "the input model")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=repo_id or Path(folder).name,
        base_model=base_name,
        direction_languages=", ".join(f"{LANGUAGE_NAMES.get(x, x)} ({x})" for x in direction.get("languages") or [])
        or "a direction file",
        layer=direction.get("layer"),
        layer_rows=direction.get("layer_rows"),
        position=direction.get("position"),
        edited_groups=groups,
        tied=(p.get("options") or {}).get("tied_embeddings"),
        eval_table=_eval_table(inputs.report) if inputs.report else None,
        findings=findings(inputs.report, p) if inputs.report else [],
        plots=plots,
        weightedit_version=p.get("weightedit_version", __version__),
        card_version=__version__,
        source_kind=source.get("kind"),
        source_model=_display(source.get("model")),
        source_revision=source.get("revision") or "(not recorded)",
        direction_sha=direction.get("sha256"),
        model_type=p.get("model_type"),
        verification=p.get("verification") or {},
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
                with atomic_file(dest / path.name) as tmp:
                    shutil.copy2(path, tmp)
    # The card replaces README.md in one rename: an interrupted write leaves the previous card, not half a new one.
    return write_text_atomic(folder / "README.md", str(card))
