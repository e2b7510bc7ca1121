"""The edit's arithmetic on stored tensors, in NumPy: what the streaming rewrite runs, without torch.

The maths is :mod:`weightedit.edit.projection`'s (which runs the same edit on torch tensors, wherever a loaded
model lives): remove ``λ`` times a unit vector ``u``'s component from every vector a writer adds to the
residual stream, optionally restore each edited vector's length, and leave bit-for-bit alone every vector
whose component is below the stored dtype's rounding noise. Arithmetic is float32 (float64 for float64
tensors) on cache-sized blocks; values are rounded back to the stored dtype as torch rounds them
(:mod:`weightedit.io.floats`), and a second pass cleans up vectors that one pass left off their aim.

Why NumPy here: the streaming rewrite is CPU work on blocks that fit the cache, and NumPy imports in a tenth
of a second where torch takes one to two, so the edit starts at once (README, "Benchmarks"). The two
implementations agree within one rounding step of the stored dtype (``tests/test_kernels.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidDirectionError
from ..io.floats import compute_dtype, decode, encode

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "BlockStats",
    "CACHE_BLOCK",
    "column_block_rows",
    "unit_vector",
    "effective_vector",
    "project_rows",
    "project_columns",
    "project_columns_streamed",
    "project_along",
]

# Elements per block: small enough that the float32 copy of a block stays in the CPU cache while several
# passes run over it, large enough that per-call overhead does not matter.
CACHE_BLOCK = 1 << 19


@dataclass
class BlockStats:
    """Running statistics of an edit, accumulated block by block."""

    changed: int = 0  # rows/columns modified
    total: int = 0  # rows/columns seen
    residual_sq: float = 0.0  # Σ (component along u after the edit - the component it aims at)²
    norm_sq: float = 0.0  # Σ ‖row‖² before the edit (rounding errors scale with it)

    def merge(self, other: BlockStats) -> None:
        self.changed += other.changed
        self.total += other.total
        self.residual_sq += other.residual_sq
        self.norm_sq += other.norm_sq

    @property
    def relative_residual(self) -> float:
        """``‖uᵀW'‖ / ‖W‖``: what the edit left along ``u``, relative to the tensor before it (0 if all zero; NaN
        when the tensor holds NaN or inf, so that no check passes on it)."""
        if self.norm_sq == 0:
            return 0.0
        return math.sqrt(self.residual_sq / self.norm_sq) if self.residual_sq >= 0 else math.nan


def column_block_rows(m: int, *, block_elems: int = CACHE_BLOCK) -> int:
    """Rows per block that :func:`project_columns_streamed` reads and writes for a matrix of ``m`` columns."""
    return max(1, block_elems // max(m, 1))


def unit_vector(direction: NDArray, d_model: int, *, name: str = "direction") -> NDArray:
    """Validate ``direction`` and return it as a unit float32 vector of length ``d_model``.

    Raises:
        InvalidDirectionError: wrong shape, non-finite values, or (near) zero norm.
    """
    r = np.asarray(direction, dtype=np.float64)
    shape = list(r.shape)
    if r.ndim == 2 and r.shape[0] == 1:
        r = r[0]
    if r.ndim != 1 or r.size != d_model:
        raise InvalidDirectionError(
            f"{name} has shape {shape} but the model's residual stream has d_model={d_model}: "
            "compute the direction on this model (weightedit direction --model ...)"
        )
    finite = np.isfinite(r)
    if not finite.all():
        raise InvalidDirectionError(
            f"{name} has {int((~finite).sum())} non-finite values (NaN/inf): recompute the direction"
        )
    norm = float(np.linalg.norm(r))
    if norm < 1e-8:
        raise InvalidDirectionError(f"{name} has zero norm ({norm:.3g}): recompute the direction")
    return (r / norm).astype(np.float32)


def unit_rows(rows: NDArray, d_model: int, *, name: str = "direction") -> NDArray:
    """:func:`unit_vector` of every row of ``rows`` (per-layer directions), ``[n_layers, d_model]`` float32; an
    error names the row."""
    return np.stack([unit_vector(row, d_model, name=f"{name} (decoder layer {i})") for i, row in enumerate(rows)])


def effective_vector(r: NDArray, norm_weight: NDArray | None, norm_offset: float = 0.0) -> NDArray:
    """The vector to project a writer against: ``r``, or for a writer followed by an RMSNorm with gain
    ``γ = norm_offset + weight`` the normalized ``γ ⊙ r``, zero where the norm zeroes the direction already
    (:func:`weightedit.edit.projection.effective_direction` gives torch tensors the same vector)."""
    if norm_weight is None:
        return r
    gamma = norm_weight.astype(np.float32).reshape(-1) + np.float32(norm_offset)
    u = gamma * r
    n = float(np.linalg.norm(u))
    if n < 1e-12:
        return np.zeros_like(r)  # the norm zeroes the direction already
    return (u / np.float32(n)).astype(np.float32)


def _norm_factors(norm_sq: NDArray, comp: NDArray, scale: float, mask: NDArray) -> NDArray:
    """Per vector, the factor that gives ``w - λ (w·u) u`` back the length of ``w`` (1 where nothing changes).

    ``‖w - λ c u‖² = ‖w‖² - (2λ - λ²) c²`` for a unit ``u``; a vector the edit shrinks to (almost) nothing keeps
    factor 1, since no rescaling can restore a zero vector.
    """
    after_sq = norm_sq - (2 * scale - scale * scale) * np.square(comp)
    usable = mask & (after_sq > 1e-12 * norm_sq)
    factor = np.sqrt(norm_sq / np.maximum(after_sq, 1e-30))
    return np.where(usable, factor, 1.0).astype(norm_sq.dtype)


class _Blocks:
    """One lane's scratch arrays for blocks of ``rows`` x ``width`` (fresh large allocations would page-fault on
    every block)."""

    def __init__(self, rows: int, width: int, code: str) -> None:
        cdt = compute_dtype(code)
        self.code = code
        self.values = np.empty((rows, width), dtype=cdt)
        self.update = np.empty((rows, width), dtype=cdt)
        self.bits = np.empty((rows, width), dtype=np.uint32) if code == "BF16" else None
        self.widens = code not in ("F32", "F64")  # whether rounding to the stored dtype can change a value

    def load(self, stored: NDArray) -> NDArray:
        x = self.values[: stored.shape[0]]
        decode(stored, self.code, out=x)
        return x

    def store(self, x: NDArray, stored: NDArray, kept: NDArray, *, axis: int, nan_free: bool) -> None:
        """Round ``x`` into ``stored``, except the vectors ``kept`` (indices along ``axis``: 0 for rows, 1 for
        columns), and make ``x`` the values stored.

        The kept vectors keep their bits: ``x - 0`` would still turn ``-0.0`` into ``+0.0``, and rounding would
        make every NaN the same NaN. They are saved and put back around the rounding (a gather and a scatter of
        the few kept vectors, against a masked copy of the whole block). ``nan_free`` says that ``x`` holds no
        NaN (see :func:`~weightedit.io.floats.encode`): BF16 values are then widened back from the rounding's
        scratch instead of from ``stored``. Either way ``x`` ends up holding the stored values (a kept vector's
        up to the sign of its zeros, which no statistic sees)."""
        rows = x.shape[0]
        bits = None if self.bits is None else self.bits[:rows]
        saved = np.take(stored, kept, axis=axis) if kept.size else None
        encode(x, self.code, out=stored, scratch=bits, nan_free=nan_free)
        if saved is not None:
            if axis == 0:
                stored[kept] = saved
            else:
                stored[:, kept] = saved
        if not self.widens:
            return
        if bits is not None and nan_free:
            np.left_shift(bits, 16, out=x.view(np.uint32))
        else:
            decode(stored, self.code, out=x)


def _finite(*arrays: NDArray) -> bool:
    """Whether every value is finite. Applied to the components along ``u``, it tells whether the vectors are:
    a NaN or an infinity in a vector makes its component NaN or infinite (``0 · inf`` is NaN)."""
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _nan_is_reported(func: Callable[..., BlockStats]) -> Callable[..., BlockStats]:
    """A NaN in a stored vector is expected input, not a fault here: its vector is kept as it is and its statistics
    come out NaN, which verification reports as an error naming the tensor. NumPy's warnings would only repeat it.
    (A fresh ``errstate`` per call: NumPy 1.x keeps an instance's saved state on the instance, shared by the lanes.)"""

    @functools.wraps(func)
    def quiet(*args: Any, **kwargs: Any) -> BlockStats:
        with np.errstate(invalid="ignore"):
            return func(*args, **kwargs)

    return quiet


@_nan_is_reported
def project_rows(
    stored: NDArray,
    code: str,
    u: NDArray,
    floor: float,
    *,
    scale: float = 1.0,
    preserve_norm: bool = False,
    block_elems: int = CACHE_BLOCK,
) -> BlockStats:
    """In place: remove ``scale`` times ``u``'s component from every row of ``stored`` (``[n, d]``, held as
    :func:`~weightedit.io.floats.storage_dtype` of ``code``).

    Rows whose relative component along ``u`` is at most ``floor`` keep their bits. With ``preserve_norm``
    every edited row is rescaled to its original length. The statistics measure each row's component along
    ``u`` against the one the edit aims at, ``(1 - scale)`` times the original (rescaled).
    """
    n, d = stored.shape
    uc = u.astype(compute_dtype(code))
    scale = float(scale)  # a NumPy scalar would change the arithmetic's dtype under NumPy 2's promotion rules
    step = max(1, min(n, block_elems // max(d, 1)))
    blocks = _Blocks(step, d, code)
    stats = BlockStats(total=n)
    floor_sq = floor * floor
    for i0 in range(0, n, step):
        part = stored[i0 : i0 + step]
        x = blocks.load(part)
        comp = x @ uc
        norm_sq = np.einsum("ij,ij->i", x, x)
        mask = np.square(comp) > floor_sq * norm_sq
        changed = int(mask.sum())
        target = comp * (1 - scale)
        if changed:
            stats.changed += changed
            factor = _norm_factors(norm_sq, comp, scale, mask) if preserve_norm else None
            if factor is not None:
                target = target * factor
            aim = np.where(mask, target, comp)
            kept = np.flatnonzero(~mask)
            # Rows below the floor are never stored: they keep their exact bits. A second pass ("twice is
            # enough") cleans up rows that were almost parallel to u, where one pass leaves rounding error of the
            # size of the removed component.
            update = comp * mask * scale
            for attempt in range(2):
                outer = np.multiply.outer(update, uc, out=blocks.update[: x.shape[0]])
                nan_free = _finite(comp, update)  # then x is finite, and x - outer holds no NaN (inf at worst)
                x -= outer
                if factor is not None and attempt == 0:
                    x *= factor[:, None]
                blocks.store(x, part, kept, axis=0, nan_free=nan_free)
                comp = x @ uc
                deviation = comp - aim
                mask = np.square(deviation) > floor_sq * norm_sq
                if not mask.any():
                    break
                update = deviation * mask
        stats.residual_sq += float(np.square(comp - target, dtype=np.float64).sum())
        stats.norm_sq += float(norm_sq.sum(dtype=np.float64))
    return stats


@_nan_is_reported
def project_columns_streamed(
    d: int,
    m: int,
    code: str,
    u: NDArray,
    floor: float,
    *,
    read: Callable[[int, int, bool], NDArray],
    write: Callable[[int, NDArray], object],
    scale: float = 1.0,
    preserve_norm: bool = False,
    block_elems: int = CACHE_BLOCK,
) -> BlockStats:
    """Remove ``u`` from every column of a ``[d, m]`` matrix read and written in blocks of rows, never held whole.

    Two passes: the first accumulates each column's component along ``u`` and its norm, the second applies the
    rank-one update and measures what is left after rounding (and a third, for the columns it left off their
    aim by more than ``floor``, as for rows).

    Args:
        read: ``read(i0, i1, updated)`` returns rows ``[i0, i1)`` (held as the stored dtype) in an array the
            function may overwrite: the original rows, or with ``updated=True`` the rows last given to ``write``.
        write: ``write(i0, rows)`` stores the edited rows ``[i0, i0 + len(rows))``.
    """
    cdt = compute_dtype(code)
    uc = u.astype(cdt)
    scale = float(scale)  # as in project_rows
    step = min(d, column_block_rows(m, block_elems=block_elems))
    blocks = _Blocks(step, m, code)
    ones = np.ones(step, dtype=cdt)
    comp = np.zeros(m, dtype=np.float64)
    norm_sq = np.zeros(m, dtype=np.float64)
    for i0 in range(0, d, step):
        x = blocks.load(read(i0, min(d, i0 + step), False))
        rows = x.shape[0]
        comp += uc[i0 : i0 + rows] @ x
        # Column sums as a matrix-vector product: much faster than a reduction over the strided axis.
        squares = np.multiply(x, x, out=blocks.update[:rows])
        norm_sq += ones[:rows] @ squares
    floor_sq = floor * floor
    mask = np.square(comp) > floor_sq * norm_sq
    stats = BlockStats(total=m, changed=int(mask.sum()))
    if not stats.changed:
        stats.residual_sq = float(np.square(comp * (1 - scale)).sum())
        stats.norm_sq = float(norm_sq.sum())
        return stats
    factor = _norm_factors(norm_sq, comp, scale, mask) if preserve_norm else None
    target = comp * (1 - scale) * (factor if factor is not None else 1)
    aim = np.where(mask, target, comp)
    update = (comp * mask * scale).astype(cdt)
    scaling = factor.astype(cdt) if factor is not None else None
    kept = np.flatnonzero(~mask)  # columns below the floor are never stored: they keep their exact bits
    after = comp
    for attempt in range(2):
        nan_free = _finite(after, update)  # as in project_rows: then the update makes no NaN
        after = np.zeros(m, dtype=np.float64)
        for i0 in range(0, d, step):
            part = read(i0, min(d, i0 + step), attempt > 0)
            x = blocks.load(part)
            rows = x.shape[0]
            x -= np.multiply.outer(uc[i0 : i0 + rows], update, out=blocks.update[:rows])
            if scaling is not None and attempt == 0:
                x *= scaling
            blocks.store(x, part, kept, axis=1, nan_free=nan_free)
            write(i0, part)
            after += uc[i0 : i0 + rows] @ x
        deviation = after - aim
        mask = np.square(deviation) > floor_sq * norm_sq
        if not mask.any():
            break
        update = (deviation * mask).astype(cdt)
    stats.residual_sq = float(np.square(after - target).sum())
    stats.norm_sq = float(norm_sq.sum())
    return stats


def project_columns(
    stored: NDArray,
    code: str,
    u: NDArray,
    floor: float,
    *,
    scale: float = 1.0,
    preserve_norm: bool = False,
    block_elems: int = CACHE_BLOCK,
) -> BlockStats:
    """In place: :func:`project_columns_streamed` on a ``[d, m]`` matrix held in memory."""
    d, m = stored.shape
    return project_columns_streamed(
        d,
        m,
        code,
        u,
        floor,
        read=lambda i0, i1, updated: stored[i0:i1],
        write=lambda i0, rows: None,  # the rows read are views of ``stored``: updated in place already
        scale=scale,
        preserve_norm=preserve_norm,
        block_elems=block_elems,
    )


def project_along(
    stored: NDArray,
    code: str,
    u: NDArray,
    axis: int,
    floor: float,
    *,
    scale: float = 1.0,
    preserve_norm: bool = False,
) -> BlockStats:
    """In place: remove ``u`` from axis ``axis`` of a contiguous stored tensor of any rank (viewed as
    ``[A, d, B]`` around ``axis``)."""
    d = stored.shape[axis]
    if u.size != d:
        raise InvalidDirectionError(f"direction has {u.size} entries but tensor axis {axis} has size {d}")
    axis = axis % stored.ndim
    a = math.prod(stored.shape[:axis])
    b = math.prod(stored.shape[axis + 1 :])
    view = stored.reshape(a, d, b)
    if not np.shares_memory(view, stored):
        raise ValueError("project_along needs a contiguous array")
    if b == 1:
        return project_rows(view.reshape(a, d), code, u, floor, scale=scale, preserve_norm=preserve_norm)
    stats = BlockStats()
    for i in range(a):
        stats.merge(project_columns(view[i], code, u, floor, scale=scale, preserve_norm=preserve_norm))
    return stats
