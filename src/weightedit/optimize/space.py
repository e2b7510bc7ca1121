"""The edit's parameters as a search space: where the direction is read, and how much each writer loses.

A point is a direction layer (fractional: the mean differences of the two layers around it, interpolated), a
post-instruction position, and an :class:`~weightedit.edit.profile.EditProfile` (an attention and an MLP layer
kernel, an embedding weight, and whether norms are kept). Optuna suggests points with :func:`suggest`; the same
parameters rebuild the point with :func:`point_from_params`, so a stored trial is reproducible.

The :class:`Anchor` is the candidate direction the first-order screen ranks best (or a default point when the
screen cannot run). The anchored search (the default) fixes the position at the anchor's and searches the layer
only within ``layer_window`` of the anchor's; the parameters it does not suggest (:func:`fixed_params`) come from
the anchor the study stores, and rebuild its points with the trials' own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..edit.profile import EditProfile, LayerKernel
from ..errors import OptionsError
from .options import DirectionScope, OptimizeOptions, SearchSpace

__all__ = [
    "Anchor",
    "EditPoint",
    "default_anchor",
    "layer_bounds",
    "fixed_params",
    "suggest",
    "point_from_params",
    "full_edit_params",
    "params_of",
    "enqueue_params",
    "direction_vector",
    "remove_harmless",
]

# The kernels' peak weight may exceed 1 a little (the component overshoots), as far as this.
PEAK_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class EditPoint:
    layer: float  # where the direction is read (fractional: interpolated); with per_layer, the anchor's (unused)
    position: int  # post-instruction position, negative
    profile: EditProfile
    per_layer: bool = False  # each decoder layer's writers lose that layer's own direction (DirectionScope)
    # The share of the direction's component along the harmless mean that is removed from it before use: None or
    # 0 keep the plain mean difference, 1 makes it orthogonal to the harmless mean (:func:`direction_vector`).
    harmless_share: float | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "direction_layer": self.layer,
            "position": self.position,
            "profile": self.profile.to_json(),
        }
        if self.per_layer:
            data["direction_scope"] = DirectionScope.PER_LAYER.value
        if self.harmless_share is not None:
            data["harmless_share"] = self.harmless_share
        return data

    @classmethod
    def from_json(cls, data: Any) -> EditPoint:
        """The point :meth:`to_json` wrote (a study report's trial records and chosen point hold it).

        Raises:
            OptionsError: ``data`` is not such a record, or a field has a value of the wrong type or range.
        """
        if not isinstance(data, dict) or not {"direction_layer", "position", "profile"} <= set(data):
            raise OptionsError("point", data, "must be a trial record with direction_layer, position and profile")
        scope = data.get("direction_scope", DirectionScope.GLOBAL.value)
        scopes = [s.value for s in DirectionScope]
        if scope not in scopes:
            raise OptionsError("point", scope, f"has an unknown direction_scope; expected one of {scopes}")
        layer, position, share = data["direction_layer"], data["position"], data.get("harmless_share")
        if isinstance(layer, bool) or not isinstance(layer, (int, float)) or not math.isfinite(layer) or layer < 0:
            raise OptionsError("point", layer, "has a direction_layer that is not a layer index (a number ≥ 0)")
        if isinstance(position, bool) or not isinstance(position, int) or position > -1:
            raise OptionsError("point", position, "has a position that is not a post-instruction position (-1, -2, …)")
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0
        ):
            raise OptionsError("point", share, "has a harmless_share that is not a number from 0 to 1")
        try:
            profile = EditProfile.from_json(data["profile"])
        except (TypeError, ValueError) as e:  # OptionsError is a ValueError: its problem names the field
            problem = getattr(e, "problem", str(e))
            raise OptionsError(
                "point", data["profile"], f"has a profile this version cannot read ({problem})"
            ) from None
        return cls(
            layer=float(layer),
            position=position,
            profile=profile,
            per_layer=scope == DirectionScope.PER_LAYER.value,
            harmless_share=None if share is None else float(share),
        )


@dataclass(frozen=True)
class Anchor:
    """Where the study's first trial (the full edit) reads the direction, and what the anchored search keeps
    near: the first-order screen's best candidate (``screened``), or, when the screen had no refusal tokens that
    qualify, 75% of the way to the layer limit at the last position."""

    layer: float
    position: int
    screened: bool

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "position": self.position, "screened": self.screened}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Anchor:
        return cls(float(data["layer"]), int(data["position"]), bool(data["screened"]))


def _layer_range(n_layers: int, options: OptimizeOptions) -> tuple[float, float]:
    return 0.0, max(0.0, options.max_layer_fraction * (n_layers - 1))


def default_anchor(n_layers: int, options: OptimizeOptions) -> Anchor:
    """The point used when the first-order screen has none: 75% of the way to the layer limit, last position."""
    return Anchor(layer=_layer_range(n_layers, options)[1] * 0.75, position=-1, screened=False)


def layer_bounds(n_layers: int, options: OptimizeOptions, anchor: Anchor | None) -> tuple[float, float]:
    """The direction layers a trial may read: below the layer limit, and with the anchored search within
    ``options.layer_window`` of the anchor's layer (clipped to the limit)."""
    low, high = _layer_range(n_layers, options)
    if options.search_space is SearchSpace.FREE:
        return low, high
    if anchor is None:
        raise ValueError("the anchored search needs the study's anchor")
    return max(low, anchor.layer - options.layer_window), min(high, anchor.layer + options.layer_window)


def fixed_params(n_layers: int, options: OptimizeOptions, anchor: Anchor | None) -> dict[str, Any]:
    """The point's parameters the search does not suggest, from the study's anchor: with the anchored search the
    position, and the layer too when its window is empty (``layer_window`` 0). The free search fixes none (and
    needs no anchor: studies made before the anchor was stored have none). With per-layer directions the layer
    is never searched (it has no part in the edit): it is the anchor's, recorded for the direction file."""
    per_layer = options.direction_scope is DirectionScope.PER_LAYER
    if options.search_space is SearchSpace.FREE:
        if not per_layer:
            return {}
        return {"direction_layer": (anchor or default_anchor(n_layers, options)).layer}
    low, high = layer_bounds(n_layers, options, anchor)
    assert anchor is not None  # layer_bounds refuses the anchored search without one
    fixed: dict[str, Any] = {"position": anchor.position}
    if high <= low or per_layer:
        fixed["direction_layer"] = anchor.layer
    return fixed


def suggest(
    trial: Any,
    n_layers: int,
    n_post: int,
    options: OptimizeOptions,
    anchor: Anchor | None,
    fixed: dict[str, Any],
) -> EditPoint:
    """A point drawn by an Optuna ``trial`` (``anchor``: the study's, needed by the anchored search; ``fixed``:
    :func:`fixed_params` for it, the parameters not suggested)."""
    if "direction_layer" not in fixed:
        trial.suggest_float("direction_layer", *layer_bounds(n_layers, options, anchor))
    if "position" not in fixed:
        trial.suggest_int("position", -n_post, -1)
    for part in ("attention", "mlp"):
        trial.suggest_float(f"{part}_center", 0.0, float(n_layers - 1))
        trial.suggest_float(f"{part}_peak", *PEAK_RANGE)
        trial.suggest_float(f"{part}_width", 1.0, float(max(n_layers, 2)))
        trial.suggest_float(f"{part}_floor", 0.0, 1.0)  # a share of the peak
    trial.suggest_float("embedding", 0.0, 1.0)
    if options.preserve_norm is None:
        trial.suggest_categorical("preserve_norm", [False, True])
    if options.orthogonal_to_harmless is None:
        trial.suggest_float("harmless_share", 0.0, 1.0)
    return point_from_params(trial.params, options, fixed)


def point_from_params(
    params: dict[str, Any], options: OptimizeOptions, fixed: dict[str, Any] | None = None
) -> EditPoint:
    """The point a trial's parameters describe, with ``fixed`` (:func:`fixed_params`) for those the search did not
    suggest."""
    params = {**(fixed or {}), **params}

    def kernel(part: str) -> LayerKernel:
        peak = float(params[f"{part}_peak"])
        return LayerKernel(
            center=float(params[f"{part}_center"]),
            peak=peak,
            width=float(params[f"{part}_width"]),
            floor=peak * float(params[f"{part}_floor"]),
        )

    keep = options.preserve_norm if options.preserve_norm is not None else bool(params.get("preserve_norm", False))
    share: float | None = None
    if options.orthogonal_to_harmless is None:
        share = float(params["harmless_share"])
    elif options.orthogonal_to_harmless:
        share = 1.0
    profile = EditProfile(
        attention=kernel("attention"), mlp=kernel("mlp"), embedding=float(params["embedding"]), preserve_norm=keep
    )
    return EditPoint(
        layer=float(params["direction_layer"]),
        position=int(params["position"]),
        profile=profile,
        per_layer=options.direction_scope is DirectionScope.PER_LAYER,
        harmless_share=share,
    )


def full_edit_params(n_layers: int, options: OptimizeOptions, anchor: Anchor) -> dict[str, Any]:
    """Parameters of the plain full edit (λ = 1 everywhere) with the direction read at ``anchor``: the study's
    first trial, so the study always holds the full edit. Only the parameters the search suggests (what
    :func:`fixed_params` fixes is left out)."""
    fixed = fixed_params(n_layers, options, anchor)
    params: dict[str, Any] = {
        k: v for k, v in {"direction_layer": anchor.layer, "position": anchor.position}.items() if k not in fixed
    }
    for part in ("attention", "mlp"):
        params.update({f"{part}_center": 0.0, f"{part}_peak": 1.0, f"{part}_width": float(max(n_layers, 2))})
        params[f"{part}_floor"] = 1.0
    params["embedding"] = 1.0
    if options.preserve_norm is None:
        params["preserve_norm"] = False
    if options.orthogonal_to_harmless is None:
        params["harmless_share"] = 0.0  # the plain mean difference
    return params


def params_of(
    point: EditPoint,
    n_layers: int,
    n_post: int,
    options: OptimizeOptions,
    anchor: Anchor | None = None,
    fixed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The parameters :func:`suggest` would have drawn for ``point`` (the inverse of :func:`point_from_params`):
    what a study enqueues to run ``point`` as one of its trials.

    ``fixed`` (:func:`fixed_params`; ``None`` when the anchor is not known yet) are the parameters the study does not
    search: ``point`` must have those values, as it must have every setting the options fix (the direction's scope,
    the harmless share, norm preservation). Without ``fixed`` those are not checked, and the direction layer and
    position are checked against the free search's ranges only. A kernel that is ``None`` (the full edit) or has no
    width limit (its peak at every layer) is given as the sampler's kernel of the same weights: centre 0, the widest
    width, the floor at the peak. A point with no harmless share has share 0 (the plain mean difference).

    Raises:
        OptionsError: ``point`` is not a point of this study's search space (<<enqueue>>): the message names the
            parameter, its value and the range or value the study allows.
    """

    def bad(name: str, value: object, allowed: str) -> OptionsError:
        return OptionsError("enqueue", value, f"has {name} {value!r}, but this study's points have {allowed}")

    scope = options.direction_scope
    assert isinstance(scope, DirectionScope)
    if point.per_layer != (scope is DirectionScope.PER_LAYER):
        kind = DirectionScope.PER_LAYER.value if point.per_layer else DirectionScope.GLOBAL.value
        raise bad("direction_scope", kind, f"{scope.value} directions (<<direction_scope>>)")

    def within(name: str, value: float, low: float, high: float, hint: str = "") -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise bad(name, value, f"{name} from {low:g} to {high:g}{hint}")
        return float(value)

    params: dict[str, Any] = {}
    fixed = fixed or {}
    position = point.position
    if isinstance(position, bool) or not isinstance(position, int):
        raise bad("position", position, "a whole-number position (-1, -2, …)")
    if "position" in fixed and position != fixed["position"]:
        raise bad(
            "position",
            position,
            f"position {fixed['position']}, the anchor's: give the point that position, or search freely "
            "(<<search_space>> free) in another <<work_dir>>",
        )
    if "position" not in fixed:
        params["position"] = int(within("position", position, -n_post, -1))
    # Per-layer points read no direction layer (each decoder layer has its own): theirs is not checked.
    if not point.per_layer and "direction_layer" in fixed:
        if not math.isclose(point.layer, fixed["direction_layer"], rel_tol=0.0, abs_tol=1e-9):
            raise bad(
                "direction_layer",
                point.layer,
                f"direction_layer {fixed['direction_layer']:g}, the anchor's (<<layer_window>> 0 fixes it): give the "
                "point that layer, or search a window (<<layer_window>>) in another <<work_dir>>",
            )
    elif not point.per_layer:
        known = anchor is not None or options.search_space is SearchSpace.FREE
        low, high = layer_bounds(n_layers, options, anchor) if known else _layer_range(n_layers, options)
        hint = "" if options.search_space is SearchSpace.FREE else " (the anchor's window: <<layer_window>>)"
        params["direction_layer"] = within("direction_layer", point.layer, low, high, hint)
    widest = float(max(n_layers, 2))
    for part in ("attention", "mlp"):
        k: LayerKernel | None = getattr(point.profile, part)
        if k is None:  # no kernel: the full edit, λ = 1 at every layer
            k = LayerKernel(center=0.0, peak=1.0, width=widest, floor=1.0)
        elif math.isinf(k.width):  # the peak at every layer: the widest kernel with its floor at the peak
            k = LayerKernel(center=0.0, peak=k.peak, width=widest, floor=k.peak)
        params[f"{part}_center"] = within(f"{part} center", k.center, 0.0, float(n_layers - 1))
        params[f"{part}_peak"] = within(f"{part} peak", k.peak, *PEAK_RANGE)
        params[f"{part}_width"] = within(f"{part} width", k.width, 1.0, widest)
        params[f"{part}_floor"] = within(f"{part} floor as a share of its peak", k.floor / k.peak, 0.0, 1.0)
    params["embedding"] = within("embedding", point.profile.embedding, 0.0, 1.0)
    keep = point.profile.preserve_norm
    if options.preserve_norm is None:
        params["preserve_norm"] = keep
    elif keep != options.preserve_norm:
        raise bad("preserve_norm", keep, f"preserve_norm {options.preserve_norm} (<<preserve_norm>>)")
    share = point.harmless_share
    if options.orthogonal_to_harmless is None:
        # A point with no share (from a study that did not search it, without orthogonal_to_harmless) is the plain
        # mean difference, share 0.
        params["harmless_share"] = within("harmless_share", 0.0 if share is None else share, 0.0, 1.0)
    elif (share or 0.0) != (1.0 if options.orthogonal_to_harmless else 0.0):
        raise bad(
            "harmless_share",
            share,
            f"harmless_share {1 if options.orthogonal_to_harmless else 0} (<<orthogonal_to_harmless>>)",
        )
    return params


def enqueue_params(
    points: Sequence[EditPoint],
    n_layers: int,
    n_post: int,
    options: OptimizeOptions,
    anchor: Anchor | None = None,
    fixed: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`params_of` for each point.

    Raises:
        OptionsError: a point is not in the study's search space; the value is ``point <i>``, its index.
    """
    params = []
    for i, point in enumerate(points):
        try:
            params.append(params_of(point, n_layers, n_post, options, anchor, fixed))
        except OptionsError as e:
            raise OptionsError("enqueue", f"point {i}", e.problem) from None
    return params


def remove_harmless(v: torch.Tensor, harmless: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """``v`` less ``share`` times its component along the unit direction of ``harmless`` (float64; not normalised)."""
    h = harmless.double()
    h = h / h.norm()
    return v - share * (v @ h) * h


def direction_vector(point: EditPoint, diffs: torch.Tensor, harmless: torch.Tensor | None = None) -> torch.Tensor:
    """The unit direction of ``point``: the mean differences ``diffs[layer, position]`` (``[n_layers, n_post, d]``,
    the input of each block), interpolated between the two layers around ``point.layer``. With
    ``point.harmless_share`` *s* (and ``harmless``, the harmless means, same shape), *s* times its component along
    the harmless mean's unit direction *h* is removed from it first: ``v - s (v·h) h``, then normalised (1: orthogonal
    to the harmless mean; 0: the plain mean difference, untouched).

    With ``point.per_layer``, ``[n_layers, d]`` unit rows: row ``l`` is read at the output of decoder layer ``l``
    (the input of block ``l + 1``; the means hold block inputs only, so the last layer reuses its input's), at
    ``point.position``. Row 0 also serves the embeddings (:func:`weightedit.edit.in_memory.orthogonalize_model_`).

    Raises:
        OptionsError: a per-layer row is zero (the harmful and harmless means agree there).
        ValueError: ``point`` has a harmless share and ``harmless`` is not given.
    """
    n_layers, n_post = diffs.shape[:2]
    share = point.harmless_share
    if share is not None and harmless is None:
        raise ValueError("a point with a harmless share needs the harmless means")
    if point.per_layer:
        p = n_post + point.position
        rows = []
        for layer in range(n_layers):
            src = min(layer + 1, n_layers - 1)
            v = diffs[src, p].double()
            if share:
                assert harmless is not None
                v = remove_harmless(v, harmless[src, p], share)
            if not float(v.norm()) > 0:
                raise OptionsError(
                    "direction_scope",
                    DirectionScope.PER_LAYER.value,
                    f"the mean difference at layer {src}, position {point.position} is zero, so decoder layer "
                    f"{layer} has no direction: use <<direction_scope>> global",
                )
            rows.append(v / v.norm())
        return torch.stack(rows).float()
    low = min(int(math.floor(point.layer)), n_layers - 1)
    high = min(low + 1, n_layers - 1)
    t = point.layer - low
    p = n_post + point.position

    def at(values: torch.Tensor) -> torch.Tensor:
        return (1 - t) * values[low, p].double() + t * values[high, p].double()

    v = at(diffs)
    if share:
        assert harmless is not None
        v = remove_harmless(v, at(harmless), share)
    return (v / v.norm()).float()
