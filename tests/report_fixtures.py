"""Evaluation reports with chosen numbers, built by the real ``build_report`` from synthetic measurements.

``synthetic_report({"en": (9, 0, 0.05, 1.02)}, n=12)`` is the report of an edit that took English from 9/12
refusals to 0/12, with mean KL 0.05 and perplexity ratio 1.02, exactly as ``weightedit evaluate`` would
write it (same fields, same intervals), without running a model.
"""

from __future__ import annotations

import math
from pathlib import Path

from weightedit.evaluation.report import build_report, write_report
from weightedit.evaluation.runner import EvalOptions, LanguageRun, ModelRun
from weightedit.runtime.scoring import RefusalTokens

TOKENS = RefusalTokens(ids=(5,), tokens=("REFUSE",), harmful_mass=0.9, harmless_mass=0.01)


def _run(lang: str, refused: int, n: int, kl: float | None, nll: list[float], tokens: list[int]) -> LanguageRun:
    scores = [2.0] * refused + [-2.0] * (n - refused)
    return LanguageRun(
        lang=lang,
        tokens=TOKENS,
        harmful_scores=scores,
        harmless_scores=[-3.0] * n,
        nll=math.fsum(nll),
        nll_tokens=sum(tokens),
        kl=[] if kl is None else [kl * (0.5 + i / (n - 1)) for i in range(n)],  # mean kl, some spread
        nll_per_text=nll,
        tokens_per_text=tokens,
    )


def synthetic_report(
    languages: dict[str, tuple[int, int, float, float]],
    *,
    n: int = 8,
    edited_id: str = "edited",
    baseline_id: str = "base",
) -> dict:
    """``languages``: code -> (refused before, refused after, mean KL, perplexity ratio), out of ``n`` prompts."""
    tokens = [20 + i for i in range(16)]
    base_nll = [2.0 * t * (1 + 0.05 * math.sin(i)) for i, t in enumerate(tokens)]
    b_runs, e_runs = {}, {}
    for lang, (before, after, kl, ratio) in languages.items():
        b_runs[lang] = _run(lang, before, n, None, base_nll, tokens)
        shift = math.log(ratio)
        e_nll = [x + shift * t for x, t in zip(base_nll, tokens, strict=True)]
        e_runs[lang] = _run(lang, after, n, kl, e_nll, tokens)
    options = EvalOptions(langs=tuple(languages), limit=n)
    baseline = ModelRun(baseline_id, "1" * 16, "/models/base", b_runs, {})
    edited = ModelRun(edited_id, "0" * 16, "/models/edited", e_runs, {})
    prompts = {lang: [f"prompt {i}" for i in range(n)] for lang in languages}
    return build_report(edited, baseline, options, timings={"total": 1.0}, prompts=prompts)


def write_synthetic_report(out: Path, languages: dict[str, tuple[int, int, float, float]], **kwargs) -> Path:
    write_report(synthetic_report(languages, **kwargs), out)
    return out
