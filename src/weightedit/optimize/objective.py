"""What every trial is scored on, and the judged re-measurement of the points that are reported or chosen.

Per language, on its *select* prompts (never the *judge* prompts the final evaluation uses): a refusal estimate
on the harmful prompts and the mean first-token KL from the unedited model on harmless prompts. The estimate is
by default the share of harmful prompts whose first-token refusal score
(:func:`weightedit.runtime.scoring.refusal_scores`, with refusal tokens derived on the language's *fit* prompts)
is positive. Estimates only steer the search; a point that is reported as a result or chosen is re-measured with
greedy generations judged per language (:func:`judged_refusal`).

With ``trial_tokens=N`` the estimate is judged too: greedy completions of ``N`` new tokens of the harmful select
prompts, judged with the study's judge, in every trial (:func:`measure`). The unedited model's completions are
then generated once, ``max(N, max_new_tokens)`` tokens long: their first ``N`` tokens give the baseline estimate,
the whole completions the judged baseline the choice reads, and a language is an objective when the latter holds
a refusal (the same languages the choice asks to clear), whether or not its first-token refusal tokens qualify. On the demo model the first-token estimate sees refusal in 9 of the 14 languages while
the judge finds it in 13 (Arabic, Italian, Dutch, Polish and Yoruba refusals open with tokens compliant answers
also open with), so a first-token search cannot aim at those.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..direction.options import SelectionOptions
from ..direction.search import live_candidates
from ..direction.selection import (
    LanguageData,
    capture_fit_means,
    harmless_select,
    language_data,
    refusal_tokens_for,
)
from ..edit.in_memory import temporarily_edited
from ..edit.profile import EditProfile
from ..errors import OptionsError
from ..evaluation.judges import Judge, make_judge
from ..evaluation.metrics import decode, generate_ids
from ..evaluation.stats import wilson_interval
from ..runtime.activations import CaptureResult, ablation_screen, last_logprobs
from ..runtime.modeling import LoadedModel
from ..runtime.scoring import RefusalTokens, kl_divergence, mean_probs, refusal_scores
from .options import OptimizeOptions
from .space import remove_harmless

__all__ = [
    "LanguageTarget",
    "Setup",
    "prepare",
    "mean_differences",
    "first_order_anchor",
    "measure",
    "judged_refusal",
]

# Fit prompts per kind that derive the refusal tokens of a language other than the direction's (cheaper than all).
_TOKEN_PROMPTS = 16


@dataclass
class LanguageTarget:
    """One language's select prompts and the unedited model's behaviour on them."""

    lang: str
    harmful: list[str]
    harmless: list[str]
    harmless_lp: torch.Tensor
    tokens: RefusalTokens
    base_refusal: float  # the trial estimate's share for the unedited model (first-token or judged)
    refuses: bool  # whether its refusal is an objective (see :func:`prepare`)
    split: str
    first_token_refusal: float | None = None  # the first-token share, also kept when the trials are judged


@dataclass
class Setup:
    """Everything the trials share: the candidate mean differences and the per-language targets."""

    diffs: torch.Tensor  # [n_layers, n_post, d]: harmful minus harmless means of the direction language
    harmless_means: torch.Tensor  # [n_layers, n_post, d]
    targets: list[LanguageTarget]
    # The direction language's harmful select prompts and refusal tokens: what the first-order screen that places
    # the study's first trial (:func:`first_order_anchor`) is computed on.
    direction_harmful: list[str] = field(default_factory=list)
    direction_tokens: RefusalTokens | None = None
    trial_tokens: int = 0  # 0: first-token estimate in the trials; N: judged completions of N tokens
    judge: Judge | None = None  # the judge of the trials' completions (built once: a model judge loads once)
    # The unedited model's judged refusal (max_new_tokens), when preparing already measured it (judged trials).
    baseline_judged: dict[str, dict[str, Any]] | None = None

    @property
    def refusing(self) -> list[LanguageTarget]:
        return [t for t in self.targets if t.refuses]


def _fit(
    loaded: LoadedModel, options: OptimizeOptions, *, progress: bool
) -> tuple[SelectionOptions, LanguageData, CaptureResult, CaptureResult]:
    """The direction language's prompts and its harmful and harmless fit means."""
    sel = SelectionOptions(
        n_train=options.n_train, n_val=options.n_score, batch_size=options.batch_size, prompts=options.prompts
    )
    data = language_data(loaded, options.direction_lang, sel, val_option="n_score")
    harmful, harmless = capture_fit_means(loaded, data, options.batch_size, progress=progress)
    return sel, data, harmful, harmless


def mean_differences(
    loaded: LoadedModel, options: OptimizeOptions, *, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`prepare` computes for the directions alone (``diffs``, ``harmless_means``): a point recorded by
    a study is rebuilt from these and its parameters (:func:`~weightedit.optimize.space.direction_vector`)."""
    _, _, harmful, harmless = _fit(loaded, options, progress=progress)
    return (harmful.means - harmless.means).float(), harmless.means.float()


def prepare(loaded: LoadedModel, options: OptimizeOptions, *, progress: bool = True) -> Setup:
    """Mean differences of ``options.direction_lang`` and the select-split baseline of every language.

    A language refuses (its refusal is an objective) when its refusal tokens qualify and the unedited model
    scores at least one harmful select prompt as a refusal; with ``options.trial_tokens``, when the unedited
    model's judged completions (``max_new_tokens`` long) of its harmful select prompts hold a refusal.

    Raises:
        OptionsError: no language of ``options.langs`` refuses (there is nothing to remove).
    """
    sel, data, harmful, harmless = _fit(loaded, options, progress=progress)
    direction_tokens = refusal_tokens_for(loaded, harmful.probs, harmless.probs, strict=False)
    targets = []
    for lang in options.langs:
        d = data if lang == data.lang else language_data(loaded, lang, sel, val_option="n_score")
        if lang == data.lang:
            tokens = direction_tokens
        else:
            fit = last_logprobs(
                loaded,
                d.harmful_train[:_TOKEN_PROMPTS] + d.harmless_train[:_TOKEN_PROMPTS],
                batch_size=options.batch_size,
            )
            k = min(_TOKEN_PROMPTS, len(d.harmful_train))
            tokens = refusal_tokens_for(loaded, mean_probs(fit[:k]), mean_probs(fit[k:]), strict=False)
        kl_texts = (
            d.harmless_val
            if options.kl_prompts == options.n_score
            else harmless_select(loaded, lang, options.kl_prompts, options.prompts, option="n_kl")
        )
        lp = last_logprobs(
            loaded,
            d.harmful_val + kl_texts,
            batch_size=options.batch_size,
            progress=progress,
            description=f"baseline {lang}",
        )
        n = len(d.harmful_val)
        base = float((refusal_scores(lp[:n], tokens.ids) > 0).float().mean())
        refuses = tokens.qualified and base > 0
        targets.append(
            LanguageTarget(
                lang,
                d.harmful_val,
                kl_texts,
                lp[n:],
                tokens,
                base,
                refuses,
                d.splits.get("select", "select split"),
                first_token_refusal=base,
            )
        )
    setup = Setup(
        diffs=(harmful.means - harmless.means).float(),
        harmless_means=harmless.means.float(),
        targets=targets,
        direction_harmful=data.harmful_val,
        direction_tokens=direction_tokens,
        trial_tokens=options.trial_tokens,
    )
    if options.trial_tokens:
        setup.judge = make_judge(options.judge)
        assert setup.judge is not None  # OptimizeOptions refuses trial_tokens with the score judge
        short, whole = _judged_completions(
            loaded,
            setup.targets,
            options,
            setup.judge,
            (options.trial_tokens, max(options.trial_tokens, options.max_new_tokens)),
            progress=progress,
            label="judging the unedited model",
        )
        setup.baseline_judged = tally(whole, setup.targets)
        shares = tally(short, setup.targets)
        for t in setup.targets:
            t.base_refusal = shares[t.lang]["rate"] or 0.0
            t.refuses = setup.baseline_judged[t.lang]["k"] > 0
    if not setup.refusing:
        if options.trial_tokens:
            raise OptionsError(
                "langs",
                ",".join(options.langs),
                f"the model refuses in none of them (no judged refusal in their {options.max_new_tokens}-token "
                "completions of the select prompts), so there is no refusal to remove: choose languages it refuses "
                "in, or a longer <<max_new_tokens>> if its refusals come late",
            )
        raise OptionsError(
            "langs",
            ",".join(options.langs),
            "the model refuses in none of them (no language has refusal tokens that qualify and a first-token "
            "refusal on its select prompts), so there is no refusal to remove: choose languages it refuses in, or "
            "<<trial_tokens>> 24 to judge completions instead",
        )
    return setup


def _judged_completions(
    loaded: LoadedModel,
    targets: list[LanguageTarget],
    options: OptimizeOptions,
    judge: Judge,
    lengths: tuple[int, ...],
    *,
    progress: bool = False,
    label: str = "judging",
) -> list[list[bool]]:
    """Verdicts of ``judge`` on the greedy completions of the targets' harmful select prompts (in target order),
    one list per length of ``lengths``: the completions are generated once, ``max(lengths)`` tokens long, and
    each length judges their first tokens."""
    texts = [p for t in targets for p in t.harmful]
    langs = [t.lang for t in targets for _ in t.harmful]
    ids = generate_ids(
        loaded,
        texts,
        max_new_tokens=max(lengths),
        batch_size=options.batch_size,
        progress=progress,
        description=label,
    )
    return [judge.judge(decode(loaded, [row[:n] for row in ids]), langs) for n in lengths]


def tally(verdicts: list[bool], targets: list[LanguageTarget]) -> dict[str, dict[str, Any]]:
    """k, n, rate and Wilson 95% interval per target of verdicts in target order (each target's harmful prompts)."""
    out: dict[str, dict[str, Any]] = {}
    at = 0
    for t in targets:
        mine = verdicts[at : at + len(t.harmful)]
        at += len(t.harmful)
        k, n = sum(mine), len(mine)
        out[t.lang] = {"k": k, "n": n, "rate": k / n if n else None, "ci": wilson_interval(k, n)}
    return out


def first_order_anchor(
    loaded: LoadedModel,
    diffs: torch.Tensor,
    harmful: list[str],
    tokens: RefusalTokens | None,
    options: OptimizeOptions,
    *,
    harmless_means: torch.Tensor | None = None,
) -> tuple[int, int] | None:
    """The candidate direction (layer within ``options.max_layer_fraction``, negative position) whose ablation
    removes most refusal score on ``harmful`` to first order: one forward and backward pass
    (:func:`weightedit.runtime.activations.ablation_screen`, the screen ``direction --search fast`` records) scores
    every candidate at once. With ``harmless_means`` each candidate is first made orthogonal to the harmless mean,
    as the trial will use it. Candidates whose mean difference is below 1e-4 of the largest (no real difference)
    are skipped, as the direction search does. ``None`` when the refusal tokens do not qualify (the screen would
    rank an arbitrary token) or no candidate is left."""
    if tokens is None or not tokens.qualified or not harmful:
        return None
    screen = ablation_screen(loaded, harmful, tokens.ids, batch_size=max(1, options.batch_size // 2))
    n_layers, n_post = diffs.shape[:2]
    highest = int(options.max_layer_fraction * (n_layers - 1))
    best: tuple[float, int, int] | None = None
    for layer, p in live_candidates(diffs[: highest + 1], highest + 1):  # the floor from the allowed layers
        v = diffs[layer, p].double()
        if harmless_means is not None:
            v = remove_harmless(v, harmless_means[layer, p])
        u = v / v.norm()
        drop = float(u @ screen @ u)
        if best is None or drop > best[0]:
            best = (drop, layer, p - n_post)
    return None if best is None else (best[1], best[2])


def measure(loaded: LoadedModel, setup: Setup, options: OptimizeOptions) -> dict[str, dict[str, float]]:
    """Refusal share and mean KL per language, for the model as it is now.

    KL is first-token on the harmless select prompts. Refusal is the first-token share (the harmful prompts ride
    in the same pass), or with ``setup.trial_tokens`` the judged share of the refusing languages' completions
    (languages that do not refuse at baseline get no refusal entry: they are not an objective)."""
    judged = setup.trial_tokens > 0
    texts: list[str] = []
    for t in setup.targets:
        texts += t.harmless if judged else t.harmful + t.harmless
    lp = last_logprobs(loaded, texts, batch_size=options.batch_size)
    out: dict[str, dict[str, float]] = {}
    at = 0
    for t in setup.targets:
        n = 0 if judged else len(t.harmful)
        m = len(t.harmless)
        kl = kl_divergence(t.harmless_lp, lp[at + n : at + n + m])
        out[t.lang] = {"kl": float(kl.mean())}
        if not judged:
            out[t.lang]["refusal"] = float((refusal_scores(lp[at : at + n], t.tokens.ids) > 0).float().mean())
        at += n + m
    if judged:
        assert setup.judge is not None  # prepare builds it for judged trials
        (verdicts,) = _judged_completions(loaded, setup.refusing, options, setup.judge, (setup.trial_tokens,))
        for lang, v in tally(verdicts, setup.refusing).items():
            out[lang]["refusal"] = v["rate"] or 0.0
    return out


def objectives(per_lang: dict[str, dict[str, float]], setup: Setup) -> tuple[float, float]:
    """(mean refusal share over the refusing languages, mean KL over all languages)."""
    refusal = sum(per_lang[t.lang]["refusal"] for t in setup.refusing) / len(setup.refusing)
    kl = sum(v["kl"] for v in per_lang.values()) / len(per_lang)
    return refusal, kl


def judged_refusal(
    loaded: LoadedModel,
    setup: Setup,
    options: OptimizeOptions,
    edit: tuple[torch.Tensor, EditProfile] | None,
    *,
    progress: bool = True,
    label: str = "judging",
) -> dict[str, dict[str, Any]]:
    """Judged refusal on each language's harmful select prompts, for the unedited model (``edit=None``) or the
    model edited with ``(direction, profile)``: k, n, rate and Wilson 95% interval per language. The ``score``
    judge (for models without text, such as the test suite's) counts a positive first-token score instead."""
    context = contextlib.nullcontext() if edit is None else temporarily_edited(loaded.model, edit[0], edit[1])
    judge = setup.judge if setup.judge is not None else make_judge(options.judge)
    with context:
        if judge is None:  # the score judge: a prompt counts as refused when its first-token score is positive
            texts = [p for t in setup.targets for p in t.harmful]
            lp = last_logprobs(loaded, texts, batch_size=options.batch_size)
            verdicts, at = [], 0
            for t in setup.targets:
                verdicts += (refusal_scores(lp[at : at + len(t.harmful)], t.tokens.ids) > 0).tolist()
                at += len(t.harmful)
        else:
            (verdicts,) = _judged_completions(
                loaded, setup.targets, options, judge, (options.max_new_tokens,), progress=progress, label=label
            )
    return tally(verdicts, setup.targets)
