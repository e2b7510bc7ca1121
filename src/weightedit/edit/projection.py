"""The edit itself: removing a direction from the output space of residual-stream writers.

For a unit vector ``u`` in the residual stream and a writer whose residual axis is ``axis``:

- axis is the last one (embeddings ``[vocab, d]``, GPT-2 Conv1D ``[d_in, d]``, biases ``[d]``): every row
  ``w`` becomes ``w - (w·u) u``;
- axis is the first one of a matrix (``nn.Linear`` ``[d, d_in]``): every column ``c`` becomes ``c - (u·c) u``.

A *partial* edit removes only a share ``λ`` of the component, ``w - λ (w·u) u`` (``λ = 1`` is the full edit, the
default), and a *norm-preserving* one then rescales each edited vector back to its original length. Here a
vector is one of the vectors the writer adds to the residual stream: a row of an embedding or Conv1D weight, a
column of an ``nn.Linear`` weight, a bias. With ``λ = 1`` both leave nothing along ``u``.

All of these are local to a row (or column), so large tensors are processed in blocks. Arithmetic is float32
(float64 for float64 tensors) and the result is cast back to the stored dtype once.

A row or column whose component along ``u`` is already below the stored dtype's rounding noise is left
bit-for-bit unchanged. That makes re-editing with the same direction an exact no-op, and it changes
nothing else: editing such a row would only move it by less than one rounding step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InvalidDirectionError
from .kernels import CACHE_BLOCK as _CACHE_BLOCK
from .kernels import BlockStats, column_block_rows, effective_vector, unit_vector
from .spans import NOISE_FACTOR

__all__ = [
    "unit_direction",
    "noise_floor",
    "effective_direction",
    "project_rows_",
    "project_columns_",
    "project_columns_streamed",
    "column_block_rows",
    "project_out_",
    "orthogonality",
    "BlockStats",
]

# How many rounding-noise standard deviations a component must exceed to count as "present" (one constant with
# the torch-free planner's :func:`~weightedit.edit.spans.noise_floor_for`).
_NOISE_FACTOR = NOISE_FACTOR


def unit_direction(direction: torch.Tensor, d_model: int, *, name: str = "direction") -> torch.Tensor:
    """Validate ``direction`` and return it as a unit float32 vector of length ``d_model``.

    Raises:
        InvalidDirectionError: wrong shape, non-finite values, or (near) zero norm.
    """
    if not isinstance(direction, torch.Tensor):
        direction = torch.as_tensor(direction)
    return torch.from_numpy(unit_vector(direction.detach().to("cpu", torch.float64).numpy(), d_model, name=name))


def noise_floor(dtype: torch.dtype, d_model: int) -> float:
    """Relative component along ``u`` that rounding to ``dtype`` alone can produce, with a wide margin.

    Rounding each of ``d_model`` entries to ``dtype`` perturbs ``w·u / ‖w‖`` by about
    ``eps / (2 sqrt(3 d_model))`` (one standard deviation); anything below ``8 eps / sqrt(d_model)`` is noise.
    """
    return _NOISE_FACTOR * torch.finfo(dtype).eps / math.sqrt(d_model)


def effective_direction(r: torch.Tensor, norm_weight: torch.Tensor | None, norm_offset: float = 0.0) -> torch.Tensor:
    """The vector to project a writer against.

    For a writer followed by an RMSNorm with effective gain ``γ = norm_offset + weight`` (post-norm
    blocks), ``rᵀ(γ ⊙ y) = (γ ⊙ r)ᵀ y``, so the writer must be made orthogonal to ``γ ⊙ r``.
    """
    if norm_weight is None:
        return r
    # One computation for every path: the streaming rewrite (NumPy), the in-memory edit and run-time ablation.
    u = effective_vector(
        r.detach().to("cpu", torch.float32).numpy(), norm_weight.detach().to("cpu", torch.float32).numpy(), norm_offset
    )
    return torch.from_numpy(u).to(r.device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_factors(norm_sq: torch.Tensor, comp: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """Per vector, the factor that gives ``w - λ (w·u) u`` back the length of ``w`` (1 where nothing changes).

    ``‖w - λ c u‖² = ‖w‖² - (2λ - λ²) c²`` for a unit ``u``; a vector the edit shrinks to (almost) nothing keeps
    factor 1, since no rescaling can restore a zero vector.
    """
    after_sq = norm_sq - (2 * scale - scale * scale) * comp.square()
    usable = mask & (after_sq > 1e-12 * norm_sq)
    return torch.where(usable, (norm_sq / after_sq.clamp_min(1e-30)).sqrt(), torch.ones_like(norm_sq))


def project_rows_(
    block: torch.Tensor,
    u: torch.Tensor,
    floor: float,
    *,
    scale: float = 1.0,
    preserve_norm: bool = False,
    block_elems: int = _CACHE_BLOCK,
) -> BlockStats:
    """In place: remove ``scale`` times ``u``'s component from every row of ``block`` (``[n, d]``, any float dtype).

    Rows whose relative component along ``u`` is at most ``floor`` are left untouched. With ``preserve_norm``
    every edited row is rescaled to its original length. The statistics measure each row's component along
    ``u`` against the one the edit aims at, ``(1 - scale)`` times the original (rescaled).
    """
    n, d = block.shape
    cdt = _compute_dtype(block.dtype)
    uc = u.to(cdt)
    step = max(1, min(n, block_elems // max(d, 1)))
    stats = BlockStats(total=n)
    # One scratch buffer for all blocks: fresh large allocations would page-fault on every block.
    scratch = torch.empty(step, d, dtype=cdt)
    for i0 in range(0, n, step):
        part = block[i0 : i0 + step]
        x = scratch[: part.shape[0]]
        x.copy_(part)
        comp = x @ uc  # (rows,)
        norm_sq = torch.linalg.vector_norm(x, dim=1).square()
        mask = comp.square() > (floor * floor) * norm_sq
        changed = int(mask.sum())
        target = comp * (1 - scale)
        if changed:
            stats.changed += changed
            factor = _norm_factors(norm_sq, comp, scale, mask) if preserve_norm else None
            if factor is not None:
                target = target * factor
            aim = torch.where(mask, target, comp)
            # Masked rows get a zero update and keep their exact bits. A second pass ("twice is enough")
            # cleans up rows that were almost parallel to u, where one pass leaves rounding error of the
            # size of the removed component.
            update = comp * mask * scale
            for attempt in range(2):
                x.addr_(update, uc, alpha=-1)
                if factor is not None and attempt == 0:
                    x.mul_(factor[:, None])
                part.copy_(x)
                if part.dtype != cdt:
                    x.copy_(part)
                comp = x @ uc
                deviation = comp - aim
                mask = deviation.square() > (floor * floor) * norm_sq
                if not bool(mask.any()):
                    break
                update = deviation * mask
        stats.residual_sq += float((comp - target).square().sum())
        stats.norm_sq += float(norm_sq.sum())
    return stats


def project_columns_(
    matrix: torch.Tensor,
    u: torch.Tensor,
    floor: float,
    *,
    scale: float = 1.0,
    preserve_norm: bool = False,
    block_elems: int = _CACHE_BLOCK,
) -> BlockStats:
    """In place: remove ``u`` from every column of ``matrix`` (``[d, m]``).

    Two passes over blocks of rows: the first accumulates each column's component along ``u`` and its
    norm, the second applies the rank-one update and measures what is left after rounding.
    """
    d, m = matrix.shape
    return project_columns_streamed(
        d,
        m,
        matrix.dtype,
        u,
        floor,
        read=lambda i0, i1, updated: matrix[i0:i1],
        write=lambda i0, rows: None,  # the rows read are views of ``matrix``: updated in place already
        scale=scale,
        preserve_norm=preserve_norm,
        block_elems=block_elems,
    )


def project_columns_streamed(
    d: int,
    m: int,
    dtype: torch.dtype,
    u: torch.Tensor,
    floor: float,
    *,
    read: Callable[[int, int, bool], torch.Tensor],
    write: Callable[[int, torch.Tensor], object],
    scale: float = 1.0,
    preserve_norm: bool = False,
    block_elems: int = _CACHE_BLOCK,
) -> BlockStats:
    """:func:`project_columns_` for a ``[d, m]`` matrix read and written in blocks of rows, never held whole.

    Args:
        read: ``read(i0, i1, updated)`` returns rows ``[i0, i1)`` in ``dtype`` as a tensor the function
            may overwrite: the original rows, or with ``updated=True`` the rows as last given to ``write``.
        write: ``write(i0, rows)`` stores the edited rows ``[i0, i0 + len(rows))``.

    The arithmetic (block boundaries, accumulation order) is the same as for a matrix held in memory, so
    both give bit-identical results.
    """
    cdt = _compute_dtype(dtype)
    uc = u.to(cdt)
    step = min(d, column_block_rows(m, block_elems=block_elems))
    scratch = torch.empty(step, m, dtype=cdt)
    squares = torch.empty(step, m, dtype=cdt)
    ones = torch.ones(step, dtype=cdt)
    comp = torch.zeros(m, dtype=torch.float64)
    norm_sq = torch.zeros(m, dtype=torch.float64)
    for i0 in range(0, d, step):
        part = read(i0, min(d, i0 + step), False)
        rows = part.shape[0]
        x = scratch[:rows]
        x.copy_(part)
        comp += (uc[i0 : i0 + step] @ x).double()
        # Column sums as a matrix-vector product: much faster than a reduction over the strided axis.
        torch.mul(x, x, out=squares[:rows])
        norm_sq += (ones[:rows] @ squares[:rows]).double()
    mask = comp.square() > (floor * floor) * norm_sq
    stats = BlockStats(total=m, changed=int(mask.sum()))
    if not stats.changed:
        stats.residual_sq = float((comp * (1 - scale)).square().sum())
        stats.norm_sq = float(norm_sq.sum())
        return stats
    factor = _norm_factors(norm_sq, comp, scale, mask) if preserve_norm else None
    target = comp * (1 - scale) * (factor if factor is not None else 1)
    aim = torch.where(mask, target, comp)
    # As for rows: a second pass only for columns that one pass left away from their aim by more than the floor.
    update = (comp * mask * scale).to(cdt)
    scaling = factor.to(cdt) if factor is not None else None
    for attempt in range(2):
        after = torch.zeros(m, dtype=torch.float64)
        for i0 in range(0, d, step):
            part = read(i0, min(d, i0 + step), attempt > 0)
            x = scratch[: part.shape[0]]
            x.copy_(part)
            x.addr_(uc[i0 : i0 + step], update, alpha=-1)
            if scaling is not None and attempt == 0:
                x.mul_(scaling)
            part.copy_(x)
            write(i0, part)
            if part.dtype != cdt:
                x.copy_(part)
            after += (uc[i0 : i0 + step] @ x).double()
        deviation = after - aim
        mask = deviation.square() > (floor * floor) * norm_sq
        if not bool(mask.any()):
            break
        update = (deviation * mask).to(cdt)
    stats.residual_sq = float((after - target).square().sum())
    stats.norm_sq = float(norm_sq.sum())
    return stats


def project_out_(
    tensor: torch.Tensor,
    u: torch.Tensor,
    axis: int,
    *,
    floor: float | None = None,
    scale: float = 1.0,
    preserve_norm: bool = False,
) -> BlockStats:
    """In place: remove ``u`` (``scale`` times its component, optionally keeping norms) from axis ``axis`` of ``tensor``.

    Works for any rank: the tensor is viewed as ``[A, d, B]`` around ``axis``.
    """
    d = tensor.shape[axis]
    if u.numel() != d:
        raise InvalidDirectionError(f"direction has {u.numel()} entries but tensor axis {axis} has size {d}")
    if not tensor.is_contiguous():
        raise ValueError("project_out_ needs a contiguous tensor")
    if floor is None:
        floor = noise_floor(tensor.dtype, d)
    axis = axis % tensor.dim()
    a = math.prod(tensor.shape[:axis])
    b = math.prod(tensor.shape[axis + 1 :])
    view = tensor.view(a, d, b)
    if b == 1:
        return project_rows_(view.view(a, d), u, floor, scale=scale, preserve_norm=preserve_norm)
    stats = BlockStats()
    for i in range(a):
        stats.merge(project_columns_(view[i], u, floor, scale=scale, preserve_norm=preserve_norm))
    return stats


def orthogonality(tensor: torch.Tensor, u: torch.Tensor, axis: int) -> float:
    """``‖uᵀW‖ / ‖W‖`` along ``axis`` (0 means the tensor writes nothing along ``u``)."""
    x = tensor.to(_compute_dtype(tensor.dtype)).movedim(axis, -1)
    comp = x @ u.to(x.dtype)
    total = float(x.pow(2).sum())
    return math.sqrt(float(comp.pow(2).sum()) / total) if total > 0 else 0.0
