"""The edit's parameters as a search space: where the direction is read, and how much each writer loses.

A point is a direction layer (fractional: the mean differences of the two layers around it, interpolated), a
post-instruction position, and an :class:`~weightedit.edit.profile.EditProfile` (an attention and an MLP layer
kernel, an embedding weight, and whether norms are kept). Optuna suggests points with :func:`suggest`; the same
parameters rebuild the point with :func:`point_from_params`, so a stored trial is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..edit.profile import EditProfile, LayerKernel
from .options import OptimizeOptions

__all__ = ["EditPoint", "suggest", "point_from_params", "full_edit_params", "direction_vector"]

# The kernels' peak weight may exceed 1 a little (the component overshoots), as far as this.
PEAK_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class EditPoint:
    layer: float  # where the direction is read (fractional: interpolated)
    position: int  # post-instruction position, negative
    profile: EditProfile

    def to_json(self) -> dict[str, Any]:
        return {"direction_layer": self.layer, "position": self.position, "profile": self.profile.to_json()}


def _layer_range(n_layers: int, options: OptimizeOptions) -> tuple[float, float]:
    return 0.0, max(0.0, options.max_layer_fraction * (n_layers - 1))


def suggest(trial: Any, n_layers: int, n_post: int, options: OptimizeOptions) -> EditPoint:
    """A point drawn by an Optuna ``trial``."""
    low, high = _layer_range(n_layers, options)
    trial.suggest_float("direction_layer", low, high)
    trial.suggest_int("position", -n_post, -1)
    for part in ("attention", "mlp"):
        trial.suggest_float(f"{part}_center", 0.0, float(n_layers - 1))
        trial.suggest_float(f"{part}_peak", *PEAK_RANGE)
        trial.suggest_float(f"{part}_width", 1.0, float(max(n_layers, 2)))
        trial.suggest_float(f"{part}_floor", 0.0, 1.0)  # a share of the peak
    trial.suggest_float("embedding", 0.0, 1.0)
    if options.preserve_norm is None:
        trial.suggest_categorical("preserve_norm", [False, True])
    return point_from_params(trial.params, options)


def point_from_params(params: dict[str, Any], options: OptimizeOptions) -> EditPoint:
    """The point a trial's parameters describe."""

    def kernel(part: str) -> LayerKernel:
        peak = float(params[f"{part}_peak"])
        return LayerKernel(
            center=float(params[f"{part}_center"]),
            peak=peak,
            width=float(params[f"{part}_width"]),
            floor=peak * float(params[f"{part}_floor"]),
        )

    keep = options.preserve_norm if options.preserve_norm is not None else bool(params.get("preserve_norm", False))
    profile = EditProfile(
        attention=kernel("attention"), mlp=kernel("mlp"), embedding=float(params["embedding"]), preserve_norm=keep
    )
    return EditPoint(layer=float(params["direction_layer"]), position=int(params["position"]), profile=profile)


def full_edit_params(
    n_layers: int, options: OptimizeOptions, *, layer: float | None = None, position: int = -1
) -> dict[str, Any]:
    """Parameters of the plain full edit (λ = 1 everywhere) with the direction read at ``layer`` (default: 75% of
    the way to the layer limit) and ``position``: the study's first trial, so the front always holds the full
    edit."""
    _, high = _layer_range(n_layers, options)
    params: dict[str, Any] = {"direction_layer": high * 0.75 if layer is None else layer, "position": position}
    for part in ("attention", "mlp"):
        params.update({f"{part}_center": 0.0, f"{part}_peak": 1.0, f"{part}_width": float(max(n_layers, 2))})
        params[f"{part}_floor"] = 1.0
    params["embedding"] = 1.0
    if options.preserve_norm is None:
        params["preserve_norm"] = False
    return params


def direction_vector(point: EditPoint, diffs: torch.Tensor, harmless: torch.Tensor | None = None) -> torch.Tensor:
    """The unit direction of ``point``: the mean differences ``diffs[layer, position]`` (``[n_layers, n_post, d]``),
    interpolated between the two layers around ``point.layer``; with ``harmless`` (the harmless means, same shape)
    the harmless mean's direction is removed from it first."""
    n_layers, n_post = diffs.shape[:2]
    low = min(int(math.floor(point.layer)), n_layers - 1)
    high = min(low + 1, n_layers - 1)
    t = point.layer - low
    p = n_post + point.position

    def at(values: torch.Tensor) -> torch.Tensor:
        return (1 - t) * values[low, p].double() + t * values[high, p].double()

    v = at(diffs)
    if harmless is not None:
        h = at(harmless)
        h = h / h.norm()
        v = v - (v @ h) * h
    return (v / v.norm()).float()
