"""What direction selection uses and how it searches, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..errors import OptionsError, enum_option

__all__ = ["Search", "SelectionOptions"]


class Search(str, Enum):
    """How candidates are scored: ``fast`` (pre-screened, adaptive) or ``thorough`` (all exactly)."""

    FAST = "fast"
    THOROUGH = "thorough"


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
        require_induce: a candidate passes the filters only if adding it induces refusal on harmless prompts
            (the default). ``False``: the KL filter alone; the induce score is then not computed. An attack on a
            defended or already-edited model wants the removal that removes most refusal within the KL filter,
            whether or not the direction still induces refusal.
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
    require_induce: bool = True
    check_generations: int = 8
    check_tokens: int = 48
    prescreen_prompts: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", enum_option("search", self.search, Search))
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
