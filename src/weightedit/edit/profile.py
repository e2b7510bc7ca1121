"""How much of the direction each writer loses: the edit's shape over layers and components.

The full edit (the default) removes the whole component along ``r`` from every writer. A *profile* sets, per
writer, the share ``λ`` of it that is removed, ``W ← W - λ r rᵀ W`` (``docs/architecture.md``, "Shaped
edits"):

- per component (attention output, MLP output, embeddings), per decoder layer ``l``, ``λ_l`` comes from a
  :class:`LayerKernel`: ``peak`` at layer ``center``, falling linearly with the distance from it to ``floor``
  at ``width`` layers away and beyond;
- the embeddings get one weight;
- ``preserve_norm`` rescales every edited residual-stream vector back to its original length.

``λ = 0`` leaves a writer untouched (its bytes are copied); ``λ = 1`` is the full edit; up to 2 is allowed
(2 reflects the component instead of removing it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import OptionsError

__all__ = ["Component", "component_of", "LayerKernel", "EditProfile", "FULL_EDIT", "MAX_WEIGHT"]

MAX_WEIGHT = 2.0


class Component(str, Enum):
    """The parts of a block a profile weights separately."""

    ATTENTION = "attention"
    MLP = "mlp"
    EMBEDDING = "embedding"


def component_of(group: str) -> Component:
    """The component of a writer group of the registry (``attn_out``, ``mlp_out_bias``, ``moe_expert_out``, ...)."""
    if "embedding" in group:
        return Component.EMBEDDING
    if group.startswith("attn"):
        return Component.ATTENTION
    return Component.MLP  # MLP outputs, MoE experts and shared experts


def _weight(option: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise OptionsError(option, value, f"must be a number from 0 to {MAX_WEIGHT}")
    if not 0.0 <= value <= MAX_WEIGHT:
        raise OptionsError(option, value, f"must be from 0 (no edit) to {MAX_WEIGHT} (1 is the full edit)")
    return float(value)


@dataclass(frozen=True)
class LayerKernel:
    """Weights over decoder layers: ``peak`` at ``center``, linearly down to ``floor`` at ``width`` layers away.

    ``λ(l) = peak + (floor - peak) · min(1, |l - center| / width)``; ``width = inf`` gives ``peak`` everywhere.
    ``center`` may be fractional (between two layers).
    """

    center: float
    peak: float = 1.0
    width: float = math.inf
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.center, (int, float)) or not math.isfinite(self.center):
            raise OptionsError("center", self.center, "must be a finite layer index")
        _weight("peak", self.peak)
        _weight("floor", self.floor)
        if not isinstance(self.width, (int, float)) or math.isnan(self.width) or self.width <= 0:
            raise OptionsError("width", self.width, "must be a positive number of layers (inf: the same everywhere)")

    def weight(self, layer: int) -> float:
        if math.isinf(self.width):
            return float(self.peak)
        t = min(1.0, abs(layer - self.center) / self.width)
        return float(self.peak + (self.floor - self.peak) * t)

    def to_json(self) -> dict[str, float | None]:
        return {
            "center": self.center,
            "peak": self.peak,
            "width": None if math.isinf(self.width) else self.width,
            "floor": self.floor,
        }

    @classmethod
    def from_json(cls, data: Any) -> LayerKernel:
        if not isinstance(data, dict) or "center" not in data:
            raise OptionsError("kernel", data, "must be an object with center, peak, width and floor")
        width = data.get("width")
        return cls(
            center=data["center"],
            peak=data.get("peak", 1.0),
            width=math.inf if width is None else width,
            floor=data.get("floor", 0.0),
        )


@dataclass(frozen=True)
class EditProfile:
    """The share of the direction each writer loses (``None`` kernels mean 1 at every layer)."""

    attention: LayerKernel | None = None
    mlp: LayerKernel | None = None
    embedding: float = 1.0
    preserve_norm: bool = False

    def __post_init__(self) -> None:
        _weight("embedding", self.embedding)
        for name in ("attention", "mlp"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, LayerKernel):
                raise OptionsError(name, value, "must be a LayerKernel or None (the full edit at every layer)")
        if not isinstance(self.preserve_norm, bool):
            raise OptionsError("preserve_norm", self.preserve_norm, "must be true or false")

    @property
    def is_full(self) -> bool:
        """Whether this is the plain full edit (λ = 1 everywhere, norms not kept)."""
        return (
            not self.preserve_norm
            and self.embedding == 1.0
            and all(
                k is None or (k.peak == 1.0 and (math.isinf(k.width) or k.floor == 1.0))
                for k in (self.attention, self.mlp)
            )
        )

    def weight(self, group: str, layer: int | None) -> float:
        """``λ`` for a writer of ``group`` (registry group) in decoder layer ``layer`` (``None``: not in a layer)."""
        component = component_of(group)
        if component is Component.EMBEDDING:
            return self.embedding
        kernel = self.attention if component is Component.ATTENTION else self.mlp
        if kernel is None or layer is None:
            return 1.0
        return kernel.weight(layer)

    def to_json(self) -> dict[str, Any]:
        return {
            "attention": None if self.attention is None else self.attention.to_json(),
            "mlp": None if self.mlp is None else self.mlp.to_json(),
            "embedding": self.embedding,
            "preserve_norm": self.preserve_norm,
        }

    @classmethod
    def from_json(cls, data: Any) -> EditProfile:
        """The profile :meth:`to_json` wrote.

        Raises:
            OptionsError: a field is missing its shape or holds a value out of range.
        """
        if not isinstance(data, dict):
            raise OptionsError("edit_profile", data, "must be a JSON object (attention, mlp, embedding, preserve_norm)")
        unknown = sorted(set(data) - {"attention", "mlp", "embedding", "preserve_norm"})
        if unknown:
            raise OptionsError(
                "edit_profile", unknown, "has unknown fields; expected attention, mlp, embedding, preserve_norm"
            )
        kernels = {
            name: None if data.get(name) is None else LayerKernel.from_json(data[name]) for name in ("attention", "mlp")
        }
        return cls(
            attention=kernels["attention"],
            mlp=kernels["mlp"],
            embedding=data.get("embedding", 1.0),
            preserve_norm=data.get("preserve_norm", False),
        )

    def describe(self) -> str:
        """One line for consoles and model cards."""
        if self.is_full:
            return "full edit (λ = 1 in every writer)"

        def kernel(k: LayerKernel | None) -> str:
            if k is None:
                return "1"
            if math.isinf(k.width):
                return f"{k.peak:g}"
            return f"{k.peak:.2f} at layer {k.center:.1f}, {k.floor:.2f} beyond ±{k.width:.1f}"

        text = f"attention {kernel(self.attention)}; MLP {kernel(self.mlp)}; embedding {self.embedding:.2f}"
        return text + ("; norms kept" if self.preserve_norm else "")


FULL_EDIT = EditProfile()
