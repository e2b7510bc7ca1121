"""Scoring candidate directions: the search strategies, and the choice among what they scored.

Exact scores (:class:`SearchContext`) cost a forward pass over the select prompts per candidate and score, so
the strategies differ in which candidates they score fully (:data:`SEARCHES`):

- ``thorough`` (:func:`search_thorough`) scores every candidate exactly (use it on a GPU);
- ``fast`` (:func:`search_fast`, the default) orders candidates by an exact *pre-screen* on a few select prompts,
  then scores fully in that order until the best passing candidate beats every unscored one by the pre-screen's
  measured error; a first-order screen is recorded beside it for comparison;
- ``fixed`` (:func:`search_fixed`) scores the one candidate a user named with a layer and position.

:func:`choose` then applies the rule of :mod:`weightedit.direction.selection`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import spearmanr

from .._progress import progress_bar
from ..errors import OptionsError, SelectionError
from ..runtime.activations import ablation_screen, last_logprobs
from ..runtime.hooks import ablate_as_edit, add
from ..runtime.modeling import LoadedModel
from ..runtime.scoring import RefusalTokens, kl_divergence, refusal_scores
from .options import Search, SelectionOptions

__all__ = [
    "CandidateScore",
    "SearchContext",
    "SEARCHES",
    "search_thorough",
    "search_fast",
    "search_fixed",
    "candidate_grid",
    "choose",
    "screen_agreement",
    "rank_correlation",
]

Strategy = Callable[["SearchContext", list[tuple[int, int]]], dict[str, Any]]


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


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two score lists (``None`` for fewer than 3 pairs or a constant list)."""
    if len(a) < 3:
        return None
    value = spearmanr(a, b).statistic
    return None if value is None or not math.isfinite(float(value)) else float(value)


@dataclass
class SearchContext:
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
        """Induce (only for candidates that pass the KL filter: it cannot rescue one that fails it; not at all
        without ``require_induce``)."""
        assert s.kl is not None
        if s.kl > self.options.kl_threshold:
            s.passes_filters = False
            return False
        if not self.options.require_induce:
            s.passes_filters = True
            return True
        if s.induce is None:
            s.induce = self.induce(s.layer, s.position + self.n_post)
        s.passes_filters = s.induce > 0
        return s.passes_filters

    def induce(self, layer: int, p: int) -> float:
        """Mean refusal score on the harmless select prompts with the raw candidate added at its layer."""
        vec = self.candidates[layer, p]
        induced = last_logprobs(
            self.loaded,
            self.harmless_val,
            batch_size=self.options.batch_size,
            intervention=lambda: add(self.loaded.model, vec, layer=layer),
        )
        return float(refusal_scores(induced, self.tokens.ids).mean())


def search_thorough(ctx: SearchContext, grid: list[tuple[int, int]], *, progress: bool) -> dict[str, Any]:
    """Every candidate scored exactly."""
    with progress_bar("scoring every candidate", len(grid), enabled=progress) as bar:
        for layer, p in grid:
            ctx.check_filters(ctx.full(layer, p))
            bar.advance()
    return {"strategy": "thorough", "scored": len(grid)}


def search_fast(ctx: SearchContext, grid: list[tuple[int, int]], *, progress: bool) -> dict[str, Any]:
    """Pre-screen every candidate exactly on a few prompts, then score fully in pre-screen order.

    Candidates whose pre-screen KL is far above the filter (3×) come last. Full scoring stops once a candidate
    passes the filters (both, or KL alone without ``require_induce``) and the next candidate's pre-screen bypass
    is more than two standard deviations of the pre-screen's error (measured on the candidates scored both ways,
    at least 0.5) above the best passing bypass, or when every candidate has been scored.
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


def search_fixed(ctx: SearchContext, grid: list[tuple[int, int]], *, progress: bool) -> dict[str, Any]:
    """The one candidate given by a layer and position, scored exactly."""
    return {**search_thorough(ctx, grid, progress=progress), "strategy": "fixed"}


# The strategy for each --search value; a grid of one candidate (a fixed layer and position) uses search_fixed.
SEARCHES: dict[Search, Callable[..., dict[str, Any]]] = {Search.FAST: search_fast, Search.THOROUGH: search_thorough}


def screen_agreement(ctx: SearchContext) -> dict[str, Any]:
    """Spearman's rank correlation of each screen with the exact bypass, over the candidates scored both ways."""
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
    return {
        "spearman_prescreen_vs_exact": rank_correlation([a for a, _ in both], [b for _, b in both]),
        "spearman_first_order_vs_exact": rank_correlation([a for a, _ in first], [b for _, b in first]),
        "pairs_compared": len(both),
    }


def live_candidates(diffs: torch.Tensor, n_layers: int) -> list[tuple[int, int]]:
    """(layer, position index) of the mean differences ``diffs`` (``[layers, positions, d]``) in the first
    ``n_layers`` layers that carry a difference: a norm above 1e-4 of the largest in ``diffs``. A (near) zero one
    carries no signal (e.g. the embedding of the template's tokens at layer 0)."""
    norms = diffs.double().norm(dim=-1)
    if not norms.numel():
        return []
    floor = 1e-4 * float(norms.max())
    layers = min(n_layers, norms.shape[0])
    return [(layer, p) for layer in range(layers) for p in range(norms.shape[1]) if norms[layer, p] > floor]


def candidate_grid(candidates: torch.Tensor, n_layers: int, options: SelectionOptions) -> list[tuple[int, int]]:
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
    grid = live_candidates(candidates, min(max_layer, n_layers))
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


def choose(ctx: SearchContext) -> tuple[CandidateScore, str, str]:
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
