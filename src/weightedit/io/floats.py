"""Stored float tensors as NumPy arrays, without torch.

NumPy has no bfloat16, so a BF16 tensor is held as its raw 16-bit patterns (``uint16``); every other float
dtype is its NumPy equivalent. :func:`decode` widens stored values to the compute dtype (float32, or float64
for F64 tensors) and :func:`encode` rounds them back the way torch does (round to nearest, ties to even), so
the streaming edit stores the bytes torch's conversions would; a NaN stays a NaN (in bfloat16 the quiet NaN
``0x7FC0``, as torch's scalar conversion writes; its vectorised one writes ``0xFFFF``).

Widening is exact, so ``encode(decode(x))`` gives ``x``'s bits back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["FLOAT_CODES", "storage_dtype", "compute_dtype", "decode", "encode", "as_stored", "widened"]

# safetensors dtype code -> how its bytes are held in NumPy.
_STORAGE: dict[str, type[np.generic]] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
}
FLOAT_CODES = frozenset(_STORAGE)
_BF16_NAN = 0x7FC0


def storage_dtype(code: str) -> np.dtype:
    """The NumPy dtype that holds a stored tensor's bytes (``uint16`` bit patterns for BF16)."""
    return np.dtype(_STORAGE[code])


def compute_dtype(code: str) -> np.dtype:
    """The dtype the edit computes in: float64 for F64 tensors, float32 for the rest."""
    return np.dtype(np.float64 if code == "F64" else np.float32)


def decode(stored: NDArray, code: str, out: NDArray | None = None) -> NDArray:
    """``stored`` (held as :func:`storage_dtype`) widened to :func:`compute_dtype`, into ``out`` when given."""
    if out is None:
        out = np.empty(stored.shape, dtype=compute_dtype(code))
    if code == "BF16":
        bits = out.view(np.uint32)
        bits[...] = stored
        bits <<= 16
    else:
        out[...] = stored
    return out


def encode(
    values: NDArray, code: str, out: NDArray, scratch: NDArray | None = None, *, nan_free: bool = False
) -> NDArray:
    """Round ``values`` (float32, or float64 for F64) to the stored dtype, into ``out`` (held as
    :func:`storage_dtype`); ``scratch`` is a ``uint32`` array of the same shape for BF16 (allocated if missing).

    For BF16, ``scratch`` is left holding each rounded value's 16 bits (so ``scratch << 16`` is the stored value
    widened back) except where ``values`` holds a NaN. ``nan_free=True`` says that ``values`` holds no NaN (the
    caller knows: e.g. every vector's component along a finite direction is finite), which skips the scan for
    one; a NaN passed anyway would be stored as whatever its bits round to.
    """
    if code != "BF16":
        with np.errstate(over="ignore"):  # beyond the dtype's range is inf, as in torch
            out[...] = values
        return out
    bits = values.view(np.uint32)
    if scratch is None:
        scratch = np.empty(values.shape, dtype=np.uint32)
    # Round to nearest even on the 16 bits that are dropped: add 0x7FFF plus the lowest kept bit.
    np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    scratch += 0x7FFF
    scratch += bits
    scratch >>= 16
    np.copyto(out, scratch, casting="unsafe")  # the high bits are zero: a plain narrowing
    if not nan_free:
        nan = np.isnan(values)
        if nan.any():
            out[nan] = _BF16_NAN
    return out


def as_stored(raw: NDArray, code: str, shape: tuple[int, ...]) -> NDArray:
    """A ``uint8`` buffer viewed as a stored tensor of ``shape`` (no copy)."""
    return raw.view(storage_dtype(code)).reshape(shape)


def widened(raw: NDArray, code: str, shape: tuple[int, ...]) -> NDArray:
    """A new array in the compute dtype with the values of the stored tensor in ``raw`` (``uint8``)."""
    return decode(as_stored(raw, code, shape), code)
