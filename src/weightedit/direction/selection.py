"""Computing the refusal direction: candidates from mean differences, then selection.

For every layer ``l`` and post-instruction position ``p``, the candidate is
``r[l, p] = mean(harmful) - mean(harmless)`` of the residual stream at the input of block ``l``, over the
*fit* prompts (:func:`weightedit.prompts.role_prompts`). Selection follows the single-direction paper, on the
*select* prompts, which are disjoint from the fit prompts and from the *judge* prompts every evaluation uses:

- *bypass*: mean refusal score on harmful prompts with the candidate removed the way the weight edit removes it
  (:func:`weightedit.hooks.ablate_as_edit`; lower is better);
- *induce*: mean refusal score on harmless prompts with ``r[l, p]`` added at block ``l`` (must be > 0, unless
  ``require_induce`` is off, as for ``verify-defence``'s attacks: the KL filter then decides alone);
- *KL*: mean KL divergence of the next-token distribution on harmless prompts under the same ablation
  (must be ≤ ``max_kl``, 0.1 by default);

layers at or beyond ``max_layer_fraction × n_layers`` are never candidates, and the lowest bypass among the
candidates that pass both filters wins. When none passes both, the lowest bypass among those that pass the
KL filter is chosen and the fallback is recorded; when none passes the KL filter, selection fails with
:class:`~weightedit.errors.SelectionError` (``allow_failing_filters`` keeps the lowest bypass anyway, and
records that it failed). A direction that failed the KL filter damages the model's ordinary answers.

Before any of this, each language is checked to refuse at all: its refusal tokens must pass the contrast test
(:func:`weightedit.scoring.derive_refusal_tokens`) and greedy completions of a few harmful *fit* prompts must
include a judged refusal. A language that does not refuse has no refusal direction to find, and is not used
unless ``allow_non_refusing`` is set.

Exact scores cost a forward pass over the select prompts per candidate and score; the search strategies
(``fast``, ``thorough``, and ``fixed`` for a given layer and position) are in :mod:`weightedit.direction.search`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._progress import console
from ..edit.direction_file import Direction, combine_directions, config_fingerprint
from ..errors import ChatTemplateError, NotRefusingError, PromptsError
from ..evaluation.judges import Judge, SubstringJudge
from ..evaluation.metrics import generate
from ..prompts import prompt_roles
from ..runtime.activations import CaptureResult, capture_means, last_logprobs
from ..runtime.modeling import LoadedModel
from ..runtime.scoring import RefusalTokens, derive_refusal_tokens, refusal_scores
from ..sources.model import public_name
from .options import Search, SelectionOptions
from .search import (
    SEARCHES,
    CandidateScore,
    SearchContext,
    candidate_grid,
    choose,
    rank_correlation,
    screen_agreement,
    search_fixed,
)

__all__ = [
    "Search",
    "SelectionOptions",
    "CandidateScore",
    "DirectionResult",
    "LanguageData",
    "compute_direction",
    "language_data",
    "refusal_tokens_for",
    "capture_language",
    "capture_fit_means",
    "check_refusal",
    "rank_correlation",
]

# Probability above which one token opening every answer, harmful or harmless, means the template puts
# something before the answer (a reasoning block, a fixed header) rather than the model choosing to refuse.
_DEGENERATE_PROB = 0.9


@dataclass
class LanguageData:
    """The prompts of one language used for a direction, formatted with the chat template."""

    lang: str
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    splits: dict[str, str] = field(default_factory=dict)  # role -> where in the source ("train split", ...)


@dataclass
class DirectionResult:
    direction: Direction
    chosen: CandidateScore
    scores: list[CandidateScore]
    refusal_tokens: dict[str, RefusalTokens]
    baseline: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "passed"  # passed | kl-only | failed-filters
    note: str = ""
    search: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int = 10) -> list[CandidateScore]:
        exact = [s for s in self.scores if s.bypass is not None]
        exact.sort(key=lambda s: (not s.passes_filters, not s.passes_kl, s.bypass))
        return exact[:n]


def _take(prompts: list[str], n: int, what: str, source: str | None, option: str) -> list[str]:
    if len(prompts) < n:
        raise PromptsError(
            f"too few prompts for the split: {what} has {len(prompts)} in {source or 'the built-in set'}, "
            f"{n} asked; lower <<{option}>> or add prompts",
            option=option,
            value=n,
        )
    return prompts[:n]


def language_data(
    loaded: LoadedModel, lang: str, options: SelectionOptions, *, val_option: str = "n_val"
) -> LanguageData:
    """Format ``lang``'s fit prompts (train) and select prompts (val); judge prompts are never read here.
    ``val_option`` is the option an error for too few select prompts names (the caller's name for ``n_val``)."""
    src = options.prompts
    data: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    for kind in ("harmful", "harmless"):
        roles = prompt_roles(src, kind, lang)
        fit, select = roles["fit"], roles["select"]
        data[f"{kind}_train"] = loaded.format(_take(fit.texts, options.n_train, f"{kind} {lang} train", src, "n_train"))
        data[f"{kind}_val"] = loaded.format(_take(select.texts, options.n_val, f"{kind} {lang} val", src, val_option))
        splits["fit"], splits["select"] = fit.description, select.description
    return LanguageData(lang=lang, splits=splits, **data)


def harmless_select(loaded: LoadedModel, lang: str, n: int, prompts: str | None, *, option: str) -> list[str]:
    """The first ``n`` of ``lang``'s harmless select prompts, formatted (``language_data``'s ``harmless_val`` with
    another count: a prefix of the same list). ``option`` is the option an error for too few names."""
    select = prompt_roles(prompts, "harmless", lang)["select"]
    return loaded.format(_take(select.texts, n, f"harmless {lang} val", prompts, option))


def refusal_tokens_for(
    loaded: LoadedModel, harmful_probs: torch.Tensor, harmless_probs: torch.Tensor, *, strict: bool = True
) -> RefusalTokens:
    """Refusal tokens from the mean first-token distributions after harmful and harmless prompts.

    Raises:
        ChatTemplateError: one token opens nearly every answer to both kinds of prompt (a template problem),
            unless ``strict`` is false (then the tokens simply do not qualify).
    """
    top = int(torch.argmax(harmful_probs * harmless_probs))
    ph, pb = float(harmful_probs[top]), float(harmless_probs[top])
    if strict and ph > _DEGENERATE_PROB and pb > _DEGENERATE_PROB:
        text = loaded.tokenizer.decode([top])
        raise ChatTemplateError(
            f"the first answer token is {text!r} with probability {ph:.2f} after harmful and {pb:.2f} after "
            "harmless prompts alike, so the chat template puts something before the answer (a reasoning block or "
            "a fixed header): pass <<chat_template>> FILE whose prompt ends where the answer starts"
        )
    return derive_refusal_tokens(harmful_probs, harmless_probs, loaded.tokenizer)


def capture_language(
    loaded: LoadedModel, data: LanguageData, options: SelectionOptions, *, progress: bool = False
) -> tuple[torch.Tensor, RefusalTokens]:
    """Candidates ``[n_layers, n_post, d_model]`` (harmful minus harmless means) and refusal tokens of ``data``,
    both from the fit prompts."""
    harmful, harmless = capture_fit_means(loaded, data, options.batch_size, progress=progress)
    tokens = refusal_tokens_for(loaded, harmful.probs, harmless.probs, strict=not options.allow_non_refusing)
    return (harmful.means - harmless.means).float(), tokens


def capture_fit_means(
    loaded: LoadedModel, data: LanguageData, batch_size: int, *, progress: bool = False
) -> tuple[CaptureResult, CaptureResult]:
    """Mean residuals and first-token distributions over ``data``'s harmful and harmless fit prompts."""
    harmful = capture_means(
        loaded,
        data.harmful_train,
        batch_size=batch_size,
        progress=progress,
        description=f"activations {data.lang} harmful",
    )
    harmless = capture_means(
        loaded,
        data.harmless_train,
        batch_size=batch_size,
        progress=progress,
        description=f"activations {data.lang} harmless",
    )
    return harmful, harmless


def check_refusal(
    loaded: LoadedModel,
    data: LanguageData,
    tokens: RefusalTokens,
    options: SelectionOptions,
    *,
    judge: Judge | None = None,
    progress: bool = False,
) -> RefusalTokens:
    """Confirm with judged generations that the model refuses in ``data.lang``.

    Greedy completions of the first ``options.check_generations`` harmful fit prompts are judged by ``judge``
    (the substring judge by default); the counts are stored on the returned tokens (see
    :attr:`RefusalTokens.refuses`).
    """

    n = min(options.check_generations, len(data.harmful_train))
    if n == 0 or not tokens.qualified:
        return tokens
    completions = generate(
        loaded,
        data.harmful_train[:n],
        max_new_tokens=options.check_tokens,
        batch_size=options.batch_size,
        progress=progress,
        description=f"checking that {data.lang} refuses",
    )
    judged = sum((judge or SubstringJudge()).judge(completions, [data.lang] * n))
    return RefusalTokens(
        tokens.ids, tokens.tokens, tokens.harmful_mass, tokens.harmless_mass, tokens.qualified, judged, n
    )


def _filtered(texts: list[str], scores: torch.Tensor, keep_positive: bool) -> tuple[list[str], torch.Tensor, bool]:
    """Keep the prompts on which the model behaves as their label says (refuses harmful, answers harmless).

    When fewer than a quarter (and fewer than 4) behave so, all prompts are kept; the third value says whether
    the filter applied, and the caller reports it.
    """
    mask = scores > 0 if keep_positive else scores < 0
    if int(mask.sum()) >= max(4, len(texts) // 4):
        idx = mask.nonzero().squeeze(1).tolist()
        return [texts[i] for i in idx], scores[mask], True
    return texts, scores, False


@dataclass
class _Baseline:
    """The select prompts that the search scores on, and the model's scores on them before any intervention."""

    harmful: list[str]
    harmless: list[str]
    harmless_lp: torch.Tensor  # next-token log-probabilities after the harmless prompts
    record: dict[str, Any]  # what the direction file and scores.json keep


def compute_direction(
    loaded: LoadedModel,
    langs: list[str],
    options: SelectionOptions | None = None,
    *,
    judge: Judge | None = None,
    progress: bool = True,
) -> DirectionResult:
    """Compute and select the refusal direction from prompts in ``langs``.

    Selection (layer and position) runs on the first language; further languages contribute their own
    direction at the same layer and position, and the unit directions are averaged.

    Raises:
        NotRefusingError: the model does not refuse in one of ``langs`` (unless ``allow_non_refusing``).
        SelectionError: no candidate passes the KL filter (unless ``allow_failing_filters``).
        ChatTemplateError: the template puts a fixed token before every answer.
    """
    options = options or SelectionOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = language_data(loaded, langs[0], options)
    candidates, tokens = capture_language(loaded, data, options, progress=progress)  # [n_layers, n_post, d]
    timings["capture"] = time.perf_counter() - t0
    t = time.perf_counter()
    tokens = _confirm_refuses(loaded, data, tokens, options, judge=judge, progress=progress)
    timings["refusal_check"] = time.perf_counter() - t

    t = time.perf_counter()
    baseline = _select_baseline(loaded, data, tokens, options, progress=progress)
    timings["baseline"] = time.perf_counter() - t

    t = time.perf_counter()
    grid = candidate_grid(candidates, loaded.n_layers, options)
    ctx = SearchContext(
        loaded=loaded,
        options=options,
        candidates=candidates,
        tokens=tokens,
        harmful_val=baseline.harmful,
        harmless_val=baseline.harmless,
        harmless_lp=baseline.harmless_lp,
        base_harmful=baseline.record["harmful_refusal_score"],
        base_harmless=baseline.record["harmless_refusal_score"],
    )
    search = _search(ctx, grid, options, progress=progress)
    timings["select"] = time.perf_counter() - t

    chosen, status, note = choose(ctx)
    if progress and status != "passed":
        console.print(f"[bold yellow]warning:[/] {note}")
    layer, pos = chosen.layer, chosen.position + loaded.n_post
    vector = candidates[layer, pos]
    refusal = {langs[0]: tokens}
    splits = {langs[0]: data.splits}
    units = [vector / vector.norm()]
    for other in langs[1:]:
        unit, refusal[other], splits[other] = _language_direction(
            loaded, other, layer, pos, options, judge=judge, progress=progress
        )
        units.append(unit)
    timings["total"] = time.perf_counter() - t0

    meta = {
        "model_revision": loaded.source.revision,
        "source": loaded.source.provenance(),
        **_prompt_record(options, splits),
        "search": search,
        "selection": _selection_record(chosen, status, note, options, loaded.n_layers),
        "baseline": baseline.record,
        "refusal_tokens": {k: v.to_dict() for k, v in refusal.items()},
        "mean_diff_norm": float(vector.norm()),
        "weightedit_version": __version__,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    config = json.loads((Path(loaded.source.folder) / "config.json").read_text())
    direction = Direction(
        vector=combine_directions([Direction(vector=u) for u in units]) if len(units) > 1 else units[0],
        layer=layer,
        position=chosen.position,
        languages=tuple(langs),
        model=loaded.source.given,
        config_hash=config_fingerprint(config),
        candidates=candidates,
        meta=meta,
    )
    return DirectionResult(
        direction=direction,
        chosen=chosen,
        scores=sorted(ctx.scores.values(), key=lambda s: (s.layer, s.position)),
        refusal_tokens=refusal,
        baseline=baseline.record,
        timings=timings,
        status=status,
        note=note,
        search=search,
    )


def _search(
    ctx: SearchContext, grid: list[tuple[int, int]], options: SelectionOptions, *, progress: bool
) -> dict[str, Any]:
    """Run the strategy of ``options.search`` (or the fixed one for a single candidate) and record its screens."""
    strategy = search_fixed if len(grid) == 1 else SEARCHES[Search(options.search)]
    return {**strategy(ctx, grid, progress=progress), **screen_agreement(ctx)}


def _prompt_record(options: SelectionOptions, splits: dict[str, dict[str, str]]) -> dict[str, Any]:
    """How many prompts of which source and splits the direction was computed and selected on."""
    return {
        "n_harmful": options.n_train,
        "n_harmless": options.n_train,
        "n_val": options.n_val,
        "prompts": public_name(options.prompts) if options.prompts else "builtin",
        "prompt_splits": splits,
    }


def _select_baseline(
    loaded: LoadedModel, data: LanguageData, tokens: RefusalTokens, options: SelectionOptions, *, progress: bool
) -> _Baseline:
    """Score the select prompts without intervention and keep those the model treats as their label says."""
    base_h = refusal_scores(
        last_logprobs(
            loaded,
            data.harmful_val,
            batch_size=options.batch_size,
            progress=progress,
            description="baseline harmful val",
        ),
        tokens.ids,
    )
    harmful_val, base_h, harmful_filtered = _filtered(data.harmful_val, base_h, keep_positive=True)
    harmless_lp = last_logprobs(
        loaded, data.harmless_val, batch_size=options.batch_size, progress=progress, description="baseline harmless val"
    )
    base_b = refusal_scores(harmless_lp, tokens.ids)
    harmless_val, _, harmless_filtered = _filtered(data.harmless_val, base_b, keep_positive=False)
    if len(harmless_val) != len(data.harmless_val):
        harmless_lp = harmless_lp[(base_b < 0).nonzero().squeeze(1)]
    filtering = {
        "harmful": (
            f"kept the {len(harmful_val)} of {len(data.harmful_val)} harmful select prompts with a positive refusal score"
            if harmful_filtered
            else f"fewer than a quarter of the {len(data.harmful_val)} harmful select prompts have a positive refusal "
            "score, so all are used"
        ),
        "harmless": (
            f"kept the {len(harmless_val)} of {len(data.harmless_val)} harmless select prompts with a negative refusal "
            "score"
            if harmless_filtered
            else f"fewer than a quarter of the {len(data.harmless_val)} harmless select prompts have a negative refusal "
            "score, so all are used"
        ),
    }
    if progress and not (harmful_filtered and harmless_filtered):
        for kind, filtered in (("harmful", harmful_filtered), ("harmless", harmless_filtered)):
            if not filtered:
                console.print(f"[yellow]note:[/] {filtering[kind]}")
    record: dict[str, Any] = {
        "harmful_refusal_score": float(base_h.mean()),
        "harmless_refusal_score": float(refusal_scores(harmless_lp, tokens.ids).mean()),
        "harmful_val_used": len(harmful_val),
        "harmless_val_used": len(harmless_val),
        "prompt_filter": filtering,
    }
    return _Baseline(harmful_val, harmless_val, harmless_lp, record)


def _language_direction(
    loaded: LoadedModel,
    lang: str,
    layer: int,
    pos: int,
    options: SelectionOptions,
    *,
    judge: Judge | None,
    progress: bool,
) -> tuple[torch.Tensor, RefusalTokens, dict[str, str]]:
    """A further language's unit direction at the chosen layer and position, its refusal tokens and splits."""
    data = language_data(loaded, lang, options)
    candidates, tokens = capture_language(loaded, data, options, progress=progress)
    tokens = _confirm_refuses(loaded, data, tokens, options, judge=judge, progress=progress)
    v = candidates[layer, pos]
    return v / v.norm(), tokens, data.splits


def _selection_record(
    chosen: CandidateScore, status: str, note: str, options: SelectionOptions, n_layers: int
) -> dict[str, Any]:
    """The chosen candidate's scores with the rule it was chosen by (the direction file's ``selection``)."""
    return {
        **chosen.to_dict(),
        "status": status,
        "note": note,
        "kl_filter_passed": chosen.kl is not None and chosen.kl <= options.kl_threshold,
        "filters": {
            "max_kl": options.kl_threshold,
            "max_layer": max(1, math.floor(options.max_layer_fraction * n_layers)) - 1,
            "induce": "> 0" if options.require_induce else "not required",
        },
    }


def _confirm_refuses(
    loaded: LoadedModel,
    data: LanguageData,
    tokens: RefusalTokens,
    options: SelectionOptions,
    *,
    judge: Judge | None,
    progress: bool,
) -> RefusalTokens:
    tokens = check_refusal(loaded, data, tokens, options, judge=judge, progress=progress)
    if not tokens.refuses:
        if not options.allow_non_refusing:
            raise NotRefusingError(lang=data.lang, reason=tokens.reason)
        if progress:
            console.print(f"[bold yellow]warning:[/] the model does not refuse in {data.lang}: {tokens.reason}")
    return tokens
