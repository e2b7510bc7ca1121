"""What ``weightedit optimize`` searches over and how, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..errors import OptionsError, enum_option

__all__ = ["Sampler", "SearchSpace", "DirectionScope", "ChoiceRule", "OptimizeOptions"]


class Sampler(str, Enum):
    """Optuna's multi-objective samplers: ``tpe`` (default, good with few trials) or ``nsga2`` (genetic)."""

    TPE = "tpe"
    NSGA2 = "nsga2"


class SearchSpace(str, Enum):
    """Where the trials may read the direction.

    ``anchored`` (default): at the first-order screen's best candidate (its position fixed, its layer within
    ``layer_window`` layers of the candidate's), the trials' budget spent on the writers' weights. ``free``: any
    layer below the layer limit and any post-instruction position.
    """

    ANCHORED = "anchored"
    FREE = "free"


class DirectionScope(str, Enum):
    """Which direction each writer loses.

    ``per-layer`` (default): the writers of decoder layer ``l`` lose the mean difference at that layer's output
    (the input of layer ``l + 1``; the last layer reuses its input's), the embeddings layer 0's; the trial's
    direction layer then has no part in the edit and is not searched. ``global``: one direction, read at the trial's direction layer,
    for every writer. On the demo model the per-layer full edit ties the global one's held-out refusal at a
    perplexity ratio of 1.001 against 1.052 (docs/optimize.md), hence the default.
    """

    GLOBAL = "global"
    PER_LAYER = "per-layer"


class ChoiceRule(str, Enum):
    """How the judged Pareto points are held to ``target_refusal`` (:func:`weightedit.optimize.study.misses`).

    ``interval`` (default): the pooled judged refusal over the languages that refuse at baseline is at most the
    target, and no one of them is significantly above it (the lower end of its Wilson 95% interval is at most
    the target). ``strict``: every language that refuses at baseline is at most the target (point estimates).
    """

    INTERVAL = "interval"
    STRICT = "strict"


@dataclass(frozen=True)
class OptimizeOptions:
    """The search for the edit's shape (:mod:`weightedit.optimize`).

    Attributes:
        langs: languages of the objectives (refusal and KL are averaged over them).
        direction_lang: language of the fit prompts the direction's mean differences come from.
        trials: trials in the study (a resumed study runs only the missing ones).
        n_train: harmful and harmless fit prompts (each) for the mean differences and refusal tokens.
        n_score: harmful and harmless select prompts per language (each) that every trial is scored on.
        batch_size: prompts per forward pass.
        prompts: prompt source (``None`` = built-in).
        sampler: :class:`Sampler`.
        seed: the sampler's seed.
        search_space: :class:`SearchSpace`: ``anchored`` (default) or ``free``.
        direction_scope: :class:`DirectionScope`: ``per-layer`` (default) or ``global``.
        layer_window: with the anchored search, the direction layer is searched this many layers either side of
            the anchor's (clipped to the layers below ``max_layer_fraction``); ``0`` fixes it there. Per-layer
            directions search no layer and ignore it (it stays in the study's key, as the first per-layer
            studies stored it).
        preserve_norm: edit norm-preserving (``True``), plain (``False``), or let the search choose (``None``).
        orthogonal_to_harmless: remove the harmless mean's direction from the refusal direction (``True``), keep
            the plain mean difference (``False``), or let the search choose the share of it removed (``None``:
            a parameter ``harmless_share`` from 0, the plain direction, to 1, orthogonal to the harmless mean).
        max_layer_fraction: the direction is read from layers below this fraction of the depth.
        target_refusal: the judged refusal rate a chosen point may keep, read by ``choice_rule``.
        choice_rule: :class:`ChoiceRule`: ``interval`` (default) or ``strict``.
        kl_budget: a chosen point's KL must not exceed this (nats); ``None``: no limit beyond the rule.
        lang_kl_budget: no language's KL may exceed this (nats), a bound on the highest language's KL where
            ``kl_budget`` bounds the mean: a trial above it is infeasible to the sampler (an Optuna constraint,
            which steers the search to feasible trials and keeps the front to them), is never judged and is never
            chosen. ``None``: no bound.
        n_kl: harmless select prompts per language that every trial's KL is measured on (``None``: ``n_score``).
            The first ``n_score`` of them are the ones ``n_score`` alone reads, so more of them only add prompts;
            KL on 8 prompts is noisy (one language's 0.110 on its first 8 test prompts was 0.054 on 32), and the
            harmless prompts cost a forward pass each, far less than the judged harmful ones.
        verify: points re-measured with judged generations before one is chosen: the trials whose estimate is near
            the target in every refusing language, lowest KL first, on the front or not.
        max_new_tokens: tokens per judged completion.
        judge: the generation judge (``substring`` or ``model:PATH``).
        trial_tokens: ``0`` (default): every trial's refusal is the first-token estimate (refusal tokens derived
            per language); ``N``: greedy completions of ``N`` new tokens of the harmful select prompts, judged, in
            every trial, and the languages that refuse are those whose unedited ``max_new_tokens`` completions
            are judged refusals (slower, but it sees refusals whose first token says nothing, and languages whose
            refusal tokens do not qualify). A refusal that comes after ``N`` tokens is not seen by the search
            (the choice still asks for it to be gone), and a short completion can end in the disclaimer of an
            answer that complies later: 24 tokens agree with 48 on 109 of 112 demo-model prompts, 16 on 108.
    """

    langs: tuple[str, ...] = ("en",)
    direction_lang: str = "en"
    trials: int = 32
    n_train: int = 64
    n_score: int = 8
    batch_size: int = 16
    prompts: str | None = None
    sampler: Sampler | str = Sampler.TPE
    seed: int = 0
    search_space: SearchSpace | str = SearchSpace.ANCHORED
    layer_window: float = 1.5
    direction_scope: DirectionScope | str = DirectionScope.PER_LAYER
    preserve_norm: bool | None = None
    orthogonal_to_harmless: bool | None = False
    max_layer_fraction: float = 0.8
    target_refusal: float = 0.03
    choice_rule: ChoiceRule | str = ChoiceRule.INTERVAL
    kl_budget: float | None = None
    lang_kl_budget: float | None = None
    n_kl: int | None = None
    verify: int = 3
    max_new_tokens: int = 96
    judge: str = "substring"
    trial_tokens: int = 0

    def __post_init__(self) -> None:
        kinds: tuple[tuple[str, type[Enum]], ...] = (
            ("sampler", Sampler),
            ("search_space", SearchSpace),
            ("direction_scope", DirectionScope),
            ("choice_rule", ChoiceRule),
        )
        for name, kind in kinds:
            object.__setattr__(self, name, enum_option(name, getattr(self, name), kind))
        for name in ("preserve_norm", "orthogonal_to_harmless"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise OptionsError(name, getattr(self, name), "must be true, false, or None (searched)")
        window = self.layer_window
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not (0 <= window < math.inf):
            raise OptionsError("layer_window", window, "must be a number of layers, 0 or more")
        object.__setattr__(self, "layer_window", float(window))
        object.__setattr__(self, "langs", tuple(self.langs))
        if not self.langs:
            raise OptionsError("langs", self.langs, "must name at least one language")
        for name in ("trials", "n_train", "n_score", "batch_size", "verify", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(name, value, "must be a whole number of at least 1")
        if isinstance(self.trial_tokens, bool) or not isinstance(self.trial_tokens, int) or self.trial_tokens < 0:
            raise OptionsError(
                "trial_tokens", self.trial_tokens, "must be 0 (first-token estimate) or a positive number of tokens"
            )
        if self.trial_tokens and self.judge == "score":
            raise OptionsError(
                "trial_tokens",
                self.trial_tokens,
                "needs a judge of text (the score judge reads no completions): pass <<judge>> substring or "
                "model:PATH, or <<trial_tokens>> 0",
            )
        if not 0 < self.max_layer_fraction <= 1:
            raise OptionsError("max_layer_fraction", self.max_layer_fraction, "must be in (0, 1]")
        if not 0 <= self.target_refusal < 1:
            raise OptionsError("target_refusal", self.target_refusal, "must be a rate from 0 to below 1")
        for name in ("kl_budget", "lang_kl_budget"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value > 0 and math.isfinite(value))
            ):
                raise OptionsError(name, value, "must be a positive number of nats")
            if value is not None:
                object.__setattr__(self, name, float(value))  # 1 and 1.0 are one study's key
        if self.n_kl is not None and (isinstance(self.n_kl, bool) or not isinstance(self.n_kl, int) or self.n_kl < 1):
            raise OptionsError("n_kl", self.n_kl, "must be a whole number of at least 1 (or unset: <<n_score>>)")

    @property
    def kl_prompts(self) -> int:
        """Harmless select prompts per language that KL is measured on."""
        return self.n_score if self.n_kl is None else self.n_kl

    def setup_key(self) -> dict[str, object]:
        """What a stored study depends on: resuming with other values would mix incomparable trials.

        Entries added since the first studies are there only when they differ from what those studies did, so
        that those keep their key: the judged trial estimate's only when it is on, the anchored search's (mode
        and window) only when it is anchored (studies made before it searched freely). The choice rule is not
        part of it: it reads the judged points after the trials, and a resumed study may be chosen from by
        either rule. The direction's scope is there only when it is per-layer; the KL prompts only when they are
        not ``n_score``'s; the per-language KL bound only when set (the sampler's constraint is stored with every
        trial, so a study resumed with another bound would steer by stale ones)."""
        added: dict[str, object] = {}
        if self.direction_scope is DirectionScope.PER_LAYER:
            added.update(direction_scope=DirectionScope.PER_LAYER.value)
        if self.trial_tokens:
            added.update(trial_tokens=self.trial_tokens, trial_judge=self.judge)
        if self.search_space is SearchSpace.ANCHORED:
            added.update(search_space=SearchSpace.ANCHORED.value, layer_window=self.layer_window)
        if self.kl_prompts != self.n_score:
            added.update(n_kl=self.kl_prompts)
        if self.lang_kl_budget is not None:
            added.update(lang_kl_budget=self.lang_kl_budget)
        return {
            "langs": list(self.langs),
            "direction_lang": self.direction_lang,
            "n_train": self.n_train,
            "n_score": self.n_score,
            "prompts": self.prompts,
            "preserve_norm": self.preserve_norm,
            "orthogonal_to_harmless": self.orthogonal_to_harmless,
            "max_layer_fraction": self.max_layer_fraction,
            **added,
        }
