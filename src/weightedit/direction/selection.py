"""Computing the refusal direction: candidates from mean differences, then selection.

For every layer ``l`` and post-instruction position ``p``, the candidate is
``r[l, p] = mean(harmful) - mean(harmless)`` of the residual stream at the input of block ``l``, over the
*fit* prompts (:func:`weightedit.prompts.role_prompts`). Selection follows the single-direction paper, on the
*select* prompts, which are disjoint from the fit prompts and from the *judge* prompts every evaluation uses:

- *bypass*: mean refusal score on harmful prompts with the candidate removed the way the weight edit removes it
  (:func:`weightedit.hooks.ablate_as_edit`; lower is better);
- *induce*: mean refusal score on harmless prompts with ``r[l, p]`` added at block ``l`` (must be > 0);
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

Exact scores cost a forward pass over the select prompts per candidate and score. Two search strategies:

- ``thorough`` (:func:`_search_thorough`) scores every candidate exactly (use it on a GPU);
- ``fast`` (:func:`_search_fast`, the default) orders candidates by an exact *pre-screen*, bypass and KL on a
  few select prompts under the real intervention, then scores candidates fully in that order until the best
  one that passes is, within the pre-screen's measured error, better than every candidate not yet scored.
  A first-order screen (attribution patching, one forward+backward pass) is recorded beside it for
  comparison; it alone misorders candidates badly on real models.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from .. import __version__
from .._progress import console, progress_bar
from ..edit.direction_file import Direction, combine_directions, config_fingerprint
from ..errors import ChatTemplateError, NotRefusingError, OptionsError, PromptsError, SelectionError
from ..evaluation.judges import Judge, SubstringJudge
from ..evaluation.metrics import generate
from ..prompts import prompt_roles
from ..runtime.activations import ablation_screen, capture_means, last_logprobs
from ..runtime.hooks import ablate_as_edit, add
from ..runtime.modeling import LoadedModel
from ..runtime.scoring import RefusalTokens, derive_refusal_tokens, kl_divergence, refusal_scores
from ..sources.model import public_name

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
    "check_refusal",
    "rank_correlation",
]


class Search(str, Enum):
    """How candidates are scored: ``fast`` (pre-screened, adaptive) or ``thorough`` (all exactly)."""

    FAST = "fast"
    THOROUGH = "thorough"


# Probability above which one token opening every answer, harmful or harmless, means the template puts
# something before the answer (a reasoning block, a fixed header) rather than the model choosing to refuse.
_DEGENERATE_PROB = 0.9


@dataclass(frozen=True)
class SelectionOptions:
    """What direction selection uses and how it searches; checked on construction.

    Attributes:
        n_train: harmful and harmless fit prompts (each) for the mean difference and the refusal tokens.
        n_val: harmful and harmless select prompts (each) for the exact scores.
        batch_size: prompts per forward pass.
        search: :class:`Search` strategy.
        top_k: candidates scored fully per round of the fast search (it widens by this many).
        max_layer_fraction: layers at or beyond this fraction of the depth are not candidates.
        kl_threshold: the KL filter (nats), ``--max-kl``.
        layer, position: a fixed candidate instead of a search (position is negative, -1 = last token).
        prompts: prompt source (``None`` = built-in).
        allow_failing_filters: keep the lowest-bypass candidate when none passes the KL filter.
        allow_non_refusing: use languages the model does not refuse in.
        check_generations: harmful fit prompts completed greedily and judged to confirm that a language
            refuses (0 skips the check).
        check_tokens: new tokens per check completion.
        prescreen_prompts: harmful and harmless select prompts (each) of the fast search's pre-screen.
    """

    n_train: int = 64
    n_val: int = 16
    batch_size: int = 16
    search: Search | str = Search.FAST
    top_k: int = 8
    max_layer_fraction: float = 0.8
    kl_threshold: float = 0.1
    layer: int | None = None
    position: int | None = None
    prompts: str | None = None
    allow_failing_filters: bool = False
    allow_non_refusing: bool = False
    check_generations: int = 8
    check_tokens: int = 48
    prescreen_prompts: int = 4

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "search", Search(self.search))
        except ValueError:
            raise OptionsError("search", self.search, f"must be one of {', '.join(s.value for s in Search)}") from None
        for name in ("n_train", "n_val", "batch_size", "top_k", "prescreen_prompts", "check_tokens"):
            if int(getattr(self, name)) < 1:
                raise OptionsError(name, getattr(self, name), "must be at least 1")
        if self.check_generations < 0:
            raise OptionsError("check_generations", self.check_generations, "must be 0 (no check) or more")
        if not 0 < self.max_layer_fraction <= 1:
            raise OptionsError("max_layer_fraction", self.max_layer_fraction, "must be in (0, 1]")
        if not (self.kl_threshold > 0 and math.isfinite(self.kl_threshold)):
            raise OptionsError("kl_threshold", self.kl_threshold, "must be a positive number of nats")
        if self.position is not None and self.position >= 0:
            raise OptionsError("position", self.position, "must be negative (-1 = the last prompt token)")


@dataclass
class CandidateScore:
    layer: int
    position: int  # negative index
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    prescreen_bypass: float | None = None
    prescreen_kl: float | None = None
    predicted_bypass: float | None = None  # first-order screen
    passes_filters: bool | None = None

    @property
    def passes_kl(self) -> bool | None:
        return None if self.kl is None else self.kl <= self._max_kl

    _max_kl: float = field(default=0.1, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def brief(self) -> str:
        kl = "—" if self.kl is None else f"{self.kl:.3f}"
        bypass = "—" if self.bypass is None else f"{self.bypass:.2f}"
        return f"layer {self.layer} position {self.position} (bypass {bypass}, KL {kl})"


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


def _take(prompts: list[str], n: int, what: str, source: str | None) -> list[str]:
    if len(prompts) < n:
        raise PromptsError(
            f"too few prompts for the split: {what} has {len(prompts)} in {source or 'the built-in set'}, "
            f"{n} asked; lower --n-train/--n-val or add prompts"
        )
    return prompts[:n]


def language_data(loaded: LoadedModel, lang: str, options: SelectionOptions) -> LanguageData:
    """Format ``lang``'s fit prompts (train) and select prompts (val); judge prompts are never read here."""
    src = options.prompts
    data: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    for kind in ("harmful", "harmless"):
        roles = prompt_roles(src, kind, lang)
        fit, select = roles["fit"], roles["select"]
        data[f"{kind}_train"] = loaded.format(_take(fit.texts, options.n_train, f"{kind} {lang} train", src))
        data[f"{kind}_val"] = loaded.format(_take(select.texts, options.n_val, f"{kind} {lang} val", src))
        splits["fit"], splits["select"] = fit.description, select.description
    return LanguageData(lang=lang, splits=splits, **data)


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
            "a fixed header): pass --chat-template FILE whose prompt ends where the answer starts"
        )
    return derive_refusal_tokens(harmful_probs, harmless_probs, loaded.tokenizer)


def capture_language(
    loaded: LoadedModel, data: LanguageData, options: SelectionOptions, *, progress: bool = False
) -> tuple[torch.Tensor, RefusalTokens]:
    """Candidates ``[n_layers, n_post, d_model]`` (harmful minus harmless means) and refusal tokens of ``data``,
    both from the fit prompts."""
    harmful = capture_means(
        loaded,
        data.harmful_train,
        batch_size=options.batch_size,
        progress=progress,
        description=f"activations {data.lang} harmful",
    )
    harmless = capture_means(
        loaded,
        data.harmless_train,
        batch_size=options.batch_size,
        progress=progress,
        description=f"activations {data.lang} harmless",
    )
    tokens = refusal_tokens_for(loaded, harmful.probs, harmless.probs, strict=not options.allow_non_refusing)
    return (harmful.means - harmless.means).float(), tokens


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


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two score lists (``None`` for fewer than 3 pairs or a constant list)."""
    if len(a) < 3:
        return None
    value = spearmanr(a, b).statistic
    return None if value is None or not math.isfinite(float(value)) else float(value)


@dataclass
class _Context:
    """What every candidate's scores are computed from."""

    loaded: LoadedModel
    options: SelectionOptions
    candidates: torch.Tensor  # [n_layers, n_post, d]
    tokens: RefusalTokens
    harmful_val: list[str]
    harmless_val: list[str]
    harmless_lp: torch.Tensor  # baseline log-probs on harmless_val
    base_harmful: float
    base_harmless: float
    scores: dict[tuple[int, int], CandidateScore] = field(default_factory=dict)

    @property
    def n_post(self) -> int:
        return self.candidates.shape[1]

    def score(self, layer: int, p: int) -> CandidateScore:
        key = (layer, p)
        if key not in self.scores:
            self.scores[key] = CandidateScore(layer=layer, position=p - self.n_post, _max_kl=self.options.kl_threshold)
        return self.scores[key]

    def unit(self, layer: int, p: int) -> torch.Tensor:
        vec = self.candidates[layer, p]
        return vec / vec.norm()

    def ablated(self, layer: int, p: int, n: int | None = None) -> tuple[float, float]:
        """Exact bypass and KL with the candidate removed as the edit removes it, on the first ``n`` select
        prompts of each kind (all by default), from one pass over both kinds."""
        harmful = self.harmful_val[:n]
        harmless = self.harmless_val[:n]
        unit = self.unit(layer, p)
        lp = last_logprobs(
            self.loaded,
            harmful + harmless,
            batch_size=self.options.batch_size,
            intervention=lambda: ablate_as_edit(self.loaded.model, unit),
        )
        bypass = float(refusal_scores(lp[: len(harmful)], self.tokens.ids).mean())
        kl = float(kl_divergence(self.harmless_lp[: len(harmless)], lp[len(harmful) :]).mean())
        return bypass, kl

    def full(self, layer: int, p: int) -> CandidateScore:
        s = self.score(layer, p)
        if s.bypass is None:
            s.bypass, s.kl = self.ablated(layer, p)
        return s

    def check_filters(self, s: CandidateScore) -> bool:
        """Induce (only for candidates that pass the KL filter: it cannot rescue one that fails it)."""
        assert s.kl is not None
        if s.kl > self.options.kl_threshold:
            s.passes_filters = False
            return False
        if s.induce is None:
            layer, p = s.layer, s.position + self.n_post
            vec = self.candidates[layer, p]
            induced = last_logprobs(
                self.loaded,
                self.harmless_val,
                batch_size=self.options.batch_size,
                intervention=lambda: add(self.loaded.model, vec, layer=layer),
            )
            s.induce = float(refusal_scores(induced, self.tokens.ids).mean())
        s.passes_filters = s.induce > 0
        return s.passes_filters


def _search_thorough(ctx: _Context, grid: list[tuple[int, int]], *, progress: bool) -> dict[str, Any]:
    """Every candidate scored exactly."""
    with progress_bar("scoring every candidate", len(grid), enabled=progress) as bar:
        for layer, p in grid:
            ctx.check_filters(ctx.full(layer, p))
            bar.advance()
    return {"strategy": "thorough", "scored": len(grid)}


def _search_fast(ctx: _Context, grid: list[tuple[int, int]], *, progress: bool) -> dict[str, Any]:
    """Pre-screen every candidate exactly on a few prompts, then score fully in pre-screen order.

    Candidates whose pre-screen KL is far above the filter (3×) come last. Full scoring stops once a candidate
    passes both filters and the next candidate's pre-screen bypass is more than two standard deviations of
    the pre-screen's error (measured on the candidates scored both ways, at least 0.5) above the best passing
    bypass, or when every candidate has been scored.
    """
    options = ctx.options
    loaded = ctx.loaded
    n = options.prescreen_prompts
    t = time.perf_counter()
    screen = ablation_screen(
        loaded, ctx.harmful_val, ctx.tokens.ids, batch_size=max(1, options.batch_size // 2), progress=progress
    )
    for layer, p in grid:
        unit = ctx.unit(layer, p).double()
        ctx.score(layer, p).predicted_bypass = ctx.base_harmful - float(unit @ screen @ unit) / len(ctx.harmful_val)
    first_order_s = time.perf_counter() - t

    t = time.perf_counter()
    with progress_bar(f"pre-screening candidates ({n}+{n} prompts)", len(grid), enabled=progress) as bar:
        for layer, p in grid:
            s = ctx.score(layer, p)
            s.prescreen_bypass, s.prescreen_kl = ctx.ablated(layer, p, n)
            bar.advance()
    prescreen_s = time.perf_counter() - t

    loose = 3 * options.kl_threshold

    def order_key(lp: tuple[int, int]) -> tuple[bool, float]:
        s = ctx.scores[lp]
        assert s.prescreen_bypass is not None and s.prescreen_kl is not None
        return (s.prescreen_kl > loose, s.prescreen_bypass)

    ranked = sorted(grid, key=order_key)
    errors: list[float] = []  # exact minus pre-screen bypass of each candidate scored so far
    best: float | None = None  # the lowest bypass among the scored candidates that pass both filters
    t = time.perf_counter()
    with progress_bar("scoring candidates in pre-screen order", len(ranked), enabled=progress) as bar:
        for i, (layer, p) in enumerate(ranked):
            s = ctx.scores[(layer, p)]
            assert s.prescreen_bypass is not None and s.prescreen_kl is not None  # every candidate was pre-screened
            if best is not None and i >= options.top_k:
                sigma = max(0.5, float(torch.tensor(errors).std())) if len(errors) > 2 else 0.5
                if s.prescreen_bypass - 2 * sigma > best or s.prescreen_kl > loose:
                    break
            bypass = ctx.full(layer, p).bypass
            assert bypass is not None  # scored just now
            errors.append(bypass - s.prescreen_bypass)
            if ctx.check_filters(s) and (best is None or bypass < best):
                best = bypass
            bar.advance()
    return {
        "strategy": "fast",
        "prescreen_prompts": n,
        "prescreened": len(grid),
        "scored": len(errors),
        "seconds": {
            "first_order_screen": round(first_order_s, 2),
            "prescreen": round(prescreen_s, 2),
            "full": round(time.perf_counter() - t, 2),
        },
    }


def _grid(candidates: torch.Tensor, n_layers: int, options: SelectionOptions) -> list[tuple[int, int]]:
    n_post = candidates.shape[1]
    max_layer = max(1, math.floor(options.max_layer_fraction * n_layers))
    if options.layer is not None or options.position is not None:
        layer = options.layer if options.layer is not None else max_layer // 2
        pos = (options.position if options.position is not None else -1) + n_post
        if not (0 <= layer < n_layers and 0 <= pos < n_post):
            raise OptionsError(
                "layer/position",
                f"{options.layer}/{options.position}",
                f"out of range: layers 0..{n_layers - 1}, positions -{n_post}..-1",
            )
        return [(layer, pos)]
    norms = candidates.norm(dim=-1)
    # Candidates with (near) zero norm carry no signal (e.g. the embedding of template tokens at layer 0).
    grid = [
        (layer, p)
        for layer in range(min(max_layer, n_layers))
        for p in range(n_post)
        if norms[layer, p] > 1e-4 * float(norms.max())
    ]
    if not grid:
        raise OptionsError(
            "max_layer_fraction",
            options.max_layer_fraction,
            f"leaves no candidate with a non-zero mean difference (layers 0..{max_layer - 1} of {n_layers}); "
            "allow deeper layers",
        )
    return grid


def _bypass(s: CandidateScore) -> float:
    """Sort key of exactly scored candidates: their bypass score (lower is better)."""
    return math.inf if s.bypass is None else s.bypass


def _choose(ctx: _Context) -> tuple[CandidateScore, str, str]:
    """The chosen candidate, its status and a note, by the rule in the module docstring."""
    exact = [s for s in ctx.scores.values() if s.bypass is not None]
    passing = [s for s in exact if s.passes_filters]
    if passing:
        return min(passing, key=_bypass), "passed", ""
    kl_ok = [s for s in exact if s.kl is not None and s.kl <= ctx.options.kl_threshold]
    if kl_ok:
        chosen = min(kl_ok, key=_bypass)
        return (
            chosen,
            "kl-only",
            f"no candidate passed the induce filter (adding it must make harmless prompts refused); chose the "
            f"lowest bypass among the {len(kl_ok)} that pass the KL filter",
        )
    best = sorted(exact, key=_bypass)[:3]
    if ctx.options.allow_failing_filters:
        return (
            best[0],
            "failed-filters",
            f"no candidate passed the KL filter (KL ≤ {ctx.options.kl_threshold}); kept the lowest bypass because "
            "failing filters were allowed: the edited model may answer ordinary prompts badly",
        )
    raise SelectionError(
        candidates=[s.brief() for s in best],
        max_kl=ctx.options.kl_threshold,
        scored=len(exact),
    )


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
    n_post = loaded.n_post

    candidates, tokens = capture_language(loaded, data, options, progress=progress)  # [n_layers, n_post, d]
    timings["capture"] = time.perf_counter() - t0
    t = time.perf_counter()
    tokens = _confirm_refuses(loaded, data, tokens, options, judge=judge, progress=progress)
    timings["refusal_check"] = time.perf_counter() - t

    t1 = time.perf_counter()
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
    baseline: dict[str, Any] = {
        "harmful_refusal_score": float(base_h.mean()),
        "harmless_refusal_score": float(refusal_scores(harmless_lp, tokens.ids).mean()),
        "harmful_val_used": len(harmful_val),
        "harmless_val_used": len(harmless_val),
        "prompt_filter": filtering,
    }
    timings["baseline"] = time.perf_counter() - t1

    grid = _grid(candidates, loaded.n_layers, options)
    ctx = _Context(
        loaded=loaded,
        options=options,
        candidates=candidates,
        tokens=tokens,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
        harmless_lp=harmless_lp,
        base_harmful=float(base_h.mean()),
        base_harmless=baseline["harmless_refusal_score"],
    )
    t2 = time.perf_counter()
    strategy: Callable[..., dict[str, Any]] = (
        _search_thorough if options.search is Search.THOROUGH or len(grid) == 1 else _search_fast
    )
    search = strategy(ctx, grid, progress=progress)
    if len(grid) == 1:
        search["strategy"] = "fixed"
    timings["select"] = time.perf_counter() - t2
    both = [
        (screen, exact)
        for s in ctx.scores.values()
        if (screen := s.prescreen_bypass) is not None and (exact := s.bypass) is not None
    ]
    first = [
        (screen, exact)
        for s in ctx.scores.values()
        if (screen := s.predicted_bypass) is not None and (exact := s.bypass) is not None
    ]
    search["spearman_prescreen_vs_exact"] = rank_correlation([a for a, _ in both], [b for _, b in both])
    search["spearman_first_order_vs_exact"] = rank_correlation([a for a, _ in first], [b for _, b in first])
    search["pairs_compared"] = len(both)

    chosen, status, note = _choose(ctx)
    if progress and status != "passed":
        console.print(f"[bold yellow]warning:[/] {note}")

    layer, pos = chosen.layer, chosen.position + n_post
    vector = candidates[layer, pos]
    refusal = {langs[0]: tokens}
    splits = {langs[0]: data.splits}
    per_lang_vectors = [Direction(vector=vector / vector.norm())]
    for other in langs[1:]:
        other_data = language_data(loaded, other, options)
        other_candidates, other_tokens = capture_language(loaded, other_data, options, progress=progress)
        refusal[other] = _confirm_refuses(loaded, other_data, other_tokens, options, judge=judge, progress=progress)
        splits[other] = other_data.splits
        v = other_candidates[layer, pos]
        per_lang_vectors.append(Direction(vector=v / v.norm()))
    unit = combine_directions(per_lang_vectors) if len(per_lang_vectors) > 1 else per_lang_vectors[0].vector
    timings["total"] = time.perf_counter() - t0

    config = json.loads((Path(loaded.source.folder) / "config.json").read_text())
    meta = {
        "model_revision": loaded.source.revision,
        "source": loaded.source.provenance(),
        "n_harmful": options.n_train,
        "n_harmless": options.n_train,
        "n_val": options.n_val,
        "prompts": public_name(options.prompts) if options.prompts else "builtin",
        "prompt_splits": splits,
        "search": search,
        "selection": {
            **chosen.to_dict(),
            "status": status,
            "note": note,
            "kl_filter_passed": chosen.kl is not None and chosen.kl <= options.kl_threshold,
            "filters": {
                "max_kl": options.kl_threshold,
                "max_layer": max(1, math.floor(options.max_layer_fraction * loaded.n_layers)) - 1,
                "induce": "> 0",
            },
        },
        "baseline": baseline,
        "refusal_tokens": {k: v.to_dict() for k, v in refusal.items()},
        "mean_diff_norm": float(vector.norm()),
        "weightedit_version": __version__,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    direction = Direction(
        vector=unit,
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
        baseline=baseline,
        timings=timings,
        status=status,
        note=note,
        search=search,
    )


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
