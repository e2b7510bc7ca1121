"""Computing the refusal direction: candidates from mean differences, then selection.

For every layer ``l`` and post-instruction position ``p``, the candidate is
``r[l, p] = mean(harmful) - mean(harmless)`` of the residual stream at the input of block ``l``.
Selection follows the single-direction paper on held-out prompts:

- *bypass*: mean refusal score on harmful prompts with the unit candidate ablated everywhere (lower is better);
- *induce*: mean refusal score on harmless prompts with ``r[l, p]`` added at block ``l`` (must be > 0);
- *KL*: mean KL divergence of the next-token distribution on harmless prompts under ablation (must be ≤ 0.1);

layers at or beyond ``0.8 × n_layers`` are discarded, and the lowest bypass wins.

The exact scores cost three forward passes per candidate, which on a CPU is minutes per candidate. The
default ``fast`` search therefore screens every candidate at once with first-order estimates from one
forward+backward pass (:func:`weightedit.activations.ablation_screen`), then runs the exact scores for the
``top_k`` best only. ``thorough`` runs the exact scores for every candidate (use it on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .activations import ablation_screen, addition_screen, capture_means, last_logprobs
from .direction import Direction, combine_directions, config_fingerprint
from .errors import PromptsError
from .hooks import ablate, add
from .modeling import LoadedModel
from .prompts import Prompt, load_prompts
from .scoring import RefusalTokens, derive_refusal_tokens, kl_divergence, refusal_scores

__all__ = [
    "SelectionOptions",
    "CandidateScore",
    "DirectionResult",
    "LanguageData",
    "compute_direction",
    "language_data",
    "refusal_tokens_for",
    "capture_language",
]


@dataclass(frozen=True)
class SelectionOptions:
    n_train: int = 64
    n_val: int = 16
    batch_size: int = 16
    search: str = "fast"  # "fast" or "thorough"
    top_k: int = 8
    max_layer_fraction: float = 0.8
    kl_threshold: float = 0.1
    layer: int | None = None
    position: int | None = None  # negative index from the end of the prompt (-1 = last token)
    prompts: str | None = None  # prompt source; None = built-in


@dataclass
class CandidateScore:
    layer: int
    position: int  # negative index
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    predicted_bypass: float | None = None
    predicted_induce: float | None = None
    passes_filters: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class LanguageData:
    """The prompts of one language used for a direction, formatted with the chat template."""

    lang: str
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]


@dataclass
class DirectionResult:
    direction: Direction
    chosen: CandidateScore
    scores: list[CandidateScore]
    refusal_tokens: dict[str, RefusalTokens]
    baseline: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)

    def top(self, n: int = 10) -> list[CandidateScore]:
        exact = [s for s in self.scores if s.bypass is not None]
        exact.sort(key=lambda s: (not s.passes_filters, s.bypass))
        return exact[:n]


def _take(prompts: list[Prompt], n: int, what: str, source: str | None) -> list[str]:
    if len(prompts) < n:
        raise PromptsError(
            f"too few prompts for the split: {what} has {len(prompts)} in {source or 'the built-in set'}, "
            f"{n} asked; lower --n-train/--n-val or add prompts"
        )
    return [p.text for p in prompts[:n]]


def language_data(loaded: LoadedModel, lang: str, options: SelectionOptions) -> LanguageData:
    """Load and format the train/val prompts of ``lang`` (val falls back to the tail of train if absent)."""
    src = options.prompts

    def get(kind: str, split: str) -> list[Prompt]:
        try:
            return load_prompts(src, kind, lang, split)  # type: ignore[arg-type]
        except PromptsError:
            if split == "val":
                return []
            raise

    data: dict[str, list[str]] = {}
    for kind in ("harmful", "harmless"):
        train, val = get(kind, "train"), get(kind, "val")
        if not val:  # a source without a val split: hold out the tail of train
            train, val = train[: len(train) - options.n_val], train[len(train) - options.n_val :]
        data[f"{kind}_train"] = loaded.format(_take(train, options.n_train, f"{kind} {lang} train", src))
        data[f"{kind}_val"] = loaded.format(_take(val, options.n_val, f"{kind} {lang} val", src))
    return LanguageData(lang=lang, **data)


def refusal_tokens_for(loaded: LoadedModel, harmful_probs: torch.Tensor, harmless_probs: torch.Tensor) -> RefusalTokens:
    return derive_refusal_tokens(harmful_probs, harmless_probs, loaded.tokenizer)


def capture_language(
    loaded: LoadedModel, data: LanguageData, options: SelectionOptions, *, progress: bool = False
) -> tuple[torch.Tensor, RefusalTokens]:
    """Candidates ``[n_layers, n_post, d_model]`` (harmful minus harmless means) and refusal tokens of ``data``."""
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
    return (harmful.means - harmless.means).float(), refusal_tokens_for(loaded, harmful.probs, harmless.probs)


def _filtered(texts: list[str], scores: torch.Tensor, keep_positive: bool) -> tuple[list[str], torch.Tensor]:
    """Keep the prompts on which the model behaves as their label says (refuses harmful, answers harmless)."""
    mask = scores > 0 if keep_positive else scores < 0
    if int(mask.sum()) >= max(4, len(texts) // 4):
        idx = mask.nonzero().squeeze(1).tolist()
        return [texts[i] for i in idx], scores[mask]
    return texts, scores


def compute_direction(
    loaded: LoadedModel,
    langs: list[str],
    options: SelectionOptions | None = None,
    *,
    progress: bool = True,
) -> DirectionResult:
    """Compute and select the refusal direction from prompts in ``langs``.

    Selection (layer and position) runs on the first language; further languages contribute their own
    direction at the same layer and position, and the unit directions are averaged.
    """
    import time

    options = options or SelectionOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = language_data(loaded, langs[0], options)
    n_layers, n_post = loaded.n_layers, loaded.n_post

    candidates, tokens = capture_language(loaded, data, options, progress=progress)  # [n_layers, n_post, d]
    timings["capture"] = time.perf_counter() - t0

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
    harmful_val, base_h = _filtered(data.harmful_val, base_h, keep_positive=True)
    harmless_lp = last_logprobs(
        loaded, data.harmless_val, batch_size=options.batch_size, progress=progress, description="baseline harmless val"
    )
    base_b = refusal_scores(harmless_lp, tokens.ids)
    harmless_val, _ = _filtered(data.harmless_val, base_b, keep_positive=False)
    if len(harmless_val) != len(data.harmless_val):
        harmless_lp = harmless_lp[(base_b < 0).nonzero().squeeze(1)]
    baseline = {
        "harmful_refusal_score": float(base_h.mean()),
        "harmless_refusal_score": float(refusal_scores(harmless_lp, tokens.ids).mean()),
        "harmful_val_used": len(harmful_val),
        "harmless_val_used": len(harmless_val),
    }
    timings["baseline"] = time.perf_counter() - t1

    max_layer = max(1, math.floor(options.max_layer_fraction * n_layers))
    norms = candidates.norm(dim=-1)
    # Candidates with (near) zero norm carry no signal (e.g. the embedding of template tokens at layer 0).
    grid = [
        (layer, p)
        for layer in range(min(max_layer, n_layers))
        for p in range(n_post)
        if norms[layer, p] > 1e-4 * float(norms.max())
    ]
    if options.layer is not None or options.position is not None:
        layer = options.layer if options.layer is not None else max_layer // 2
        pos = (options.position if options.position is not None else -1) + n_post
        if not (0 <= layer < n_layers and 0 <= pos < n_post):
            raise PromptsError(
                f"--layer {options.layer} / --position {options.position} out of range: layers 0..{n_layers - 1}, "
                f"positions -{n_post}..-1"
            )
        grid = [(layer, pos)]

    def bypass_of(layer: int, p: int) -> CandidateScore:
        vec = candidates[layer, p]
        unit = vec / vec.norm()
        lp = last_logprobs(
            loaded, harmful_val, batch_size=options.batch_size, intervention=lambda: ablate(loaded.model, unit)
        )
        score = scores.get((layer, p)) or CandidateScore(layer=layer, position=p - n_post)
        score.bypass = float(refusal_scores(lp, tokens.ids).mean())
        scores[(layer, p)] = score
        return score

    def check_filters(score: CandidateScore) -> bool:
        layer, p = score.layer, score.position + n_post
        vec = candidates[layer, p]
        unit = vec / vec.norm()
        induced = last_logprobs(
            loaded,
            harmless_val,
            batch_size=options.batch_size,
            intervention=lambda: add(loaded.model, vec, layer=layer),
        )
        score.induce = float(refusal_scores(induced, tokens.ids).mean())
        ablated = last_logprobs(
            loaded, harmless_val, batch_size=options.batch_size, intervention=lambda: ablate(loaded.model, unit)
        )
        score.kl = float(kl_divergence(harmless_lp, ablated).mean())
        score.passes_filters = score.kl <= options.kl_threshold and score.induce > 0
        return score.passes_filters

    scores: dict[tuple[int, int], CandidateScore] = {}
    t2 = time.perf_counter()
    if len(grid) > 1 and options.search == "fast":
        screen_m = ablation_screen(
            loaded, harmful_val, tokens.ids, batch_size=max(1, options.batch_size // 2), progress=progress
        )
        screen_g = addition_screen(
            loaded, harmless_val, tokens.ids, batch_size=max(1, options.batch_size // 2), progress=progress
        )
        for layer, p in grid:
            vec = candidates[layer, p].double()
            unit = vec / vec.norm()
            s = CandidateScore(layer=layer, position=p - n_post)
            s.predicted_bypass = float(base_h.mean()) - float(unit @ screen_m @ unit) / len(harmful_val)
            s.predicted_induce = baseline["harmless_refusal_score"] + float(screen_g[layer] @ vec) / len(harmless_val)
            scores[(layer, p)] = s
        ranked = sorted(grid, key=lambda lp: scores[lp].predicted_bypass)  # type: ignore[arg-type,return-value]
    else:
        ranked = list(grid)
    timings["screen"] = time.perf_counter() - t2

    from ._progress import progress_bar

    t3 = time.perf_counter()
    chosen: CandidateScore | None = None
    if options.search == "thorough" or len(grid) == 1:
        # Every score for every candidate; then the lowest bypass among those that pass the filters.
        with progress_bar("scoring every candidate", len(ranked), enabled=progress) as bar:
            for layer, p in ranked:
                check_filters(bypass_of(layer, p))
                bar.advance()
        evaluated = [scores[lp] for lp in ranked]
        passing = [s for s in evaluated if s.passes_filters]
        chosen = min(passing or evaluated, key=lambda s: s.bypass)  # type: ignore[arg-type,return-value]
    else:
        # Exact bypass for the best screened candidates; the filters only for as many, in order of
        # bypass, as it takes to find one that passes.
        evaluated = []
        done = 0
        while chosen is None and done < min(len(ranked), 3 * options.top_k):
            batch = ranked[done : done + options.top_k]
            with progress_bar("scoring screened candidates", len(batch), enabled=progress) as bar:
                for layer, p in batch:
                    evaluated.append(bypass_of(layer, p))
                    bar.advance()
            done += len(batch)
            for s in sorted(evaluated, key=lambda s: s.bypass):  # type: ignore[arg-type,return-value]
                if s.passes_filters is None and check_filters(s):
                    chosen = s
                    break
        if chosen is None:
            chosen = min(evaluated, key=lambda s: s.bypass)  # type: ignore[arg-type,return-value]
    timings["select"] = time.perf_counter() - t3
    if not chosen.passes_filters:
        chosen_note = "no candidate passed the KL/induce filters; the lowest bypass was kept"
    else:
        chosen_note = ""

    layer, pos = chosen.layer, chosen.position + n_post
    vector = candidates[layer, pos]
    refusal = {langs[0]: tokens}
    per_lang_vectors = [Direction(vector=vector / vector.norm())]
    for other in langs[1:]:
        other_candidates, refusal[other] = capture_language(
            loaded, language_data(loaded, other, options), options, progress=progress
        )
        v = other_candidates[layer, pos]
        per_lang_vectors.append(Direction(vector=v / v.norm()))
    unit = combine_directions(per_lang_vectors) if len(per_lang_vectors) > 1 else per_lang_vectors[0].vector
    timings["total"] = time.perf_counter() - t0

    import json
    from pathlib import Path

    config = json.loads((Path(loaded.source.folder) / "config.json").read_text())
    meta = {
        "model_revision": loaded.source.revision,
        "source": loaded.source.provenance(),
        "n_harmful": options.n_train,
        "n_harmless": options.n_train,
        "n_val": options.n_val,
        "prompts": options.prompts or "builtin",
        "search": options.search if len(grid) > 1 else "fixed",
        "selection": {**chosen.to_dict(), "note": chosen_note},
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
        scores=sorted(scores.values(), key=lambda s: (s.layer, s.position)),
        refusal_tokens=refusal,
        baseline=baseline,
        timings=timings,
    )
