"""The streaming edit's NumPy arithmetic (weightedit.edit.kernels, weightedit.io.floats) against torch.

The rewrite computes in NumPy so that it never imports torch; the in-memory edit (a loaded model, possibly on a
GPU) computes in torch. Both must store the values torch's conversions would, and agree within a rounding step
of the stored dtype; the guarantees of the edit (rows below the noise floor keep their bits, a second edit with
the same direction changes nothing, the residual stays under the floor) must hold for the NumPy kernels alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightedit.edit import kernels
from weightedit.edit.projection import noise_floor, project_out_
from weightedit.errors import InvalidDirectionError
from weightedit.io import floats

TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored(t: torch.Tensor, code: str) -> np.ndarray:
    """A torch tensor's bytes as the NumPy array that holds them (uint16 patterns for BF16)."""
    if code == "BF16":
        return t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
    return t.contiguous().numpy().copy()


@pytest.mark.parametrize("code", ["BF16", "F16"])
def test_rounding_to_the_stored_dtype_is_torchs(code):
    """Every float32 bit pattern class: ties, values that round to inf, subnormals, infinities, NaN."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            3.3895e38,
            65519.0,
            65520.0,
            1e-40,
            -1e-45,
            6e-8,
            2**-24 * 0.5,
        ],
        dtype=torch.float32,
    )
    values = torch.cat([values, special, values * 2**-100, values * 2**-120])
    # A NaN stays a NaN; its bits are not compared (torch's own scalar and vectorised conversions differ there).
    want = _stored(values.to(TORCH[code]), code)
    got = floats.encode(values.numpy(), code, out=np.empty(values.shape, dtype=floats.storage_dtype(code)))
    nan = np.isnan(values.numpy())
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    assert nan.any()
    assert np.isnan(floats.decode(got[nan], code)).all()


def test_rounding_values_known_finite_skips_the_nan_scan_and_leaves_the_rounded_bits():
    """``nan_free=True`` (no NaN scan) rounds every non-NaN pattern as torch does, and the scratch it leaves holds
    the rounded 16 bits, so that shifting them back is the stored value widened."""
    g = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    values = values[~values.isnan()]
    extremes = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1.0 + 2**-8, 3.3895e38, 1e-40], dtype=torch.float32
    )
    values = torch.cat([values, extremes, values * 2**-100]).numpy()
    want = _stored(torch.from_numpy(values).to(torch.bfloat16), "BF16")
    scratch = np.empty(values.shape, dtype=np.uint32)
    got = floats.encode(values, "BF16", out=np.empty(values.shape, dtype=np.uint16), scratch=scratch, nan_free=True)
    assert np.array_equal(got, want)
    assert np.array_equal((scratch << 16).view(np.float32), floats.decode(want, "BF16"))


@pytest.mark.parametrize("code", ["BF16", "F16", "F32", "F64"])
def test_widening_is_exact_and_round_trips(code):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4096, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 6, (4096,), generator=g)
    t = t.to(TORCH[code])
    stored = _stored(t, code)
    wide = floats.decode(stored, code)
    assert wide.dtype == floats.compute_dtype(code)
    assert np.array_equal(wide, t.to(torch.float64 if code == "F64" else torch.float32).numpy())
    again = floats.encode(wide, code, out=np.empty_like(stored))
    assert np.array_equal(again.view(np.uint8), stored.view(np.uint8))


def _unit(d: int, seed: int) -> torch.Tensor:
    """A unit float32 direction whose first four entries are zero (so vectors that live there are exactly
    orthogonal to it, in any dtype)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u[:4] = 0
    return (u / u.norm()).to(torch.float32)


QUIET = 3  # the first vectors of every test writer: nothing, or less than the floor, along u


def _writer(shape: tuple[int, ...], u: torch.Tensor, axis: int, seed: int, floor: float = 0.0) -> torch.Tensor:
    """A random float64 writer whose vectors along ``axis`` have a strong component along ``u`` (2 to 5 times
    ``u``), except the first :data:`QUIET`: two with none (they live in the first four coordinates, one holding
    ``-0.0`` entries) and one with half of ``floor`` (relative to its norm)."""
    g = torch.Generator().manual_seed(seed)
    d = shape[axis]
    moved = [s for i, s in enumerate(shape) if i != axis] + [d]
    ud = u.double()
    w = torch.randn(*moved, generator=g, dtype=torch.float64)
    w = w - (w @ ud)[..., None] * ud
    sign = torch.randint(0, 2, (*moved[:-1], 1), generator=g).double() * 2 - 1
    w = w + sign * (2 + 3 * torch.rand(*moved[:-1], 1, generator=g, dtype=torch.float64)) * ud
    flat = w.view(-1, d)
    flat[:2, 4:] = 0
    flat[1, 4:] = -0.0
    quiet = flat[2] - (flat[2] @ ud) * ud
    flat[2] = quiet + 0.5 * floor * quiet.norm() * ud
    return w.movedim(-1, axis).contiguous()


CASES = [
    ("BF16", (40, 64), 1),  # an embedding: rows
    ("F16", (40, 64), 1),
    ("F32", (40, 64), 1),
    ("F64", (40, 64), 1),
    ("BF16", (64, 48), 0),  # an nn.Linear: columns
    ("F16", (64, 48), 0),
    ("F32", (64, 48), 0),
    ("F64", (64, 48), 0),
    ("BF16", (3, 64, 5), 1),  # a stack: columns of each slice
]


@pytest.mark.parametrize("scale,keep", [(1.0, False), (0.6, False), (0.6, True), (1.0, True)])
@pytest.mark.parametrize("code,shape,axis", CASES)
def test_numpy_kernels_agree_with_torch_within_a_rounding_step(code, shape, axis, scale, keep):
    u = _unit(shape[axis], seed=7)
    w = _writer(shape, u, axis, seed=11).to(TORCH[code])
    floor = noise_floor(TORCH[code], shape[axis])

    in_torch = w.clone()
    torch_stats = project_out_(in_torch, u, axis, floor=floor, scale=scale, preserve_norm=keep)
    stored = _stored(w, code)
    np_stats = kernels.project_along(stored, code, u.numpy(), axis, floor, scale=scale, preserve_norm=keep)

    got = torch.from_numpy(floats.decode(stored, code)).double()
    want = in_torch.double()
    step = torch.finfo(TORCH[code]).eps * w.double().abs().amax()  # one rounding step of the largest entry
    assert float((got - want).abs().max()) <= 4 * float(step)
    assert np_stats.changed == torch_stats.changed
    assert np_stats.total == torch_stats.total
    assert np_stats.relative_residual <= floor
    # the statistics describe the bytes as stored (what verification trusts): recomputed from them in float64
    wd = w.double().movedim(axis, -1)
    c = wd @ u.double()
    n_sq = wd.square().sum(-1)
    kept = (n_sq / (n_sq - (2 * scale - scale**2) * c.square())).sqrt() if keep else torch.ones_like(c)
    changed = c.square() > floor**2 * wd.square().sum(-1)
    target = torch.where(changed, (1 - scale) * c * kept, c)
    after = got.movedim(axis, -1) @ u.double()
    residual = float(((after - target).square().sum() / wd.square().sum()).sqrt())
    if code in ("BF16", "F16"):  # where rounding to the stored dtype dominates what is left
        # within a factor of two (the kernel's own dot products round too), and never blind to the stored rounding
        assert 0.5 * residual <= np_stats.relative_residual <= 2 * residual
    # the formula in float64, as the stored dtype can hold it (the direction itself is float32, so no closer than that)
    exact = wd - scale * c[..., None] * u.double()
    if keep:
        exact = exact * (wd.norm(dim=-1) / exact.norm(dim=-1)).nan_to_num(1.0)[..., None]
    f32_step = torch.finfo(torch.float32).eps * w.double().abs().amax()
    assert float((got - exact.movedim(-1, axis)).abs().max()) <= 4 * max(float(step), float(f32_step))


@pytest.mark.parametrize("code,shape,axis", CASES)
def test_vectors_below_the_floor_keep_their_bits_and_a_second_edit_changes_nothing(code, shape, axis):
    u = _unit(shape[axis], seed=5)
    floor = noise_floor(TORCH[code], shape[axis])
    w = _writer(shape, u, axis, seed=3, floor=floor).to(TORCH[code])
    stored = _stored(w, code)
    before = stored.copy()
    stats = kernels.project_along(stored, code, u.numpy(), axis, floor)
    # in float64 the floor is at the level of the rounding that built the half-floor vector: only two are quiet
    quiet = 2 if code == "F64" else QUIET
    assert stats.changed == stats.total - quiet
    as_vectors = np.ascontiguousarray(np.moveaxis(stored, axis, -1)).reshape(-1, shape[axis])
    before_vectors = np.ascontiguousarray(np.moveaxis(before, axis, -1)).reshape(-1, shape[axis])
    same_bits = (
        as_vectors.view(np.uint8).reshape(len(as_vectors), -1)
        == before_vectors.view(np.uint8).reshape(len(as_vectors), -1)
    ).all(axis=1)
    assert same_bits[:quiet].all(), "a vector below the floor was rewritten (-0.0 entries included)"
    assert not same_bits[QUIET:].any()
    once = stored.copy()
    again = kernels.project_along(stored, code, u.numpy(), axis, floor)
    assert again.changed == 0
    assert np.array_equal(stored.view(np.uint8), once.view(np.uint8))


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("shape,axis", [((40, 64), 1), ((64, 48), 0)])
def test_a_nan_leaves_its_vector_alone_and_the_statistics_nan(code, shape, axis):
    """A vector holding a NaN is never stored (its bits, payload included, stay), the other vectors are edited
    as if it were not there, and the statistics come out NaN so that verification refuses the tensor."""
    u = _unit(shape[axis], seed=9)
    floor = noise_floor(TORCH[code], shape[axis])
    clean = _stored(_writer(shape, u, axis, seed=4).to(TORCH[code]), code)
    poisoned = clean.copy()
    vectors = np.moveaxis(poisoned, axis, -1)  # a view: vectors[i] is the i-th vector the edit sees
    payload = {"BF16": np.uint16(0x7FA1), "F16": np.uint16(0x7E01), "F32": np.uint32(0x7FC00ABC)}[code]
    vectors.view(payload.dtype)[5, 7] = payload
    before = vectors[5].copy()
    reference = clean.copy()
    kernels.project_along(reference, code, u.numpy(), axis, floor)
    stats = kernels.project_along(poisoned, code, u.numpy(), axis, floor)

    def bits(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).view(np.uint8)

    assert np.array_equal(bits(vectors[5]), bits(before))
    others = np.ones(vectors.shape[0], dtype=bool)
    others[5] = False
    edited = np.moveaxis(reference, axis, -1)
    assert np.array_equal(bits(vectors[others]), bits(edited[others]))
    assert math.isnan(stats.relative_residual)


@pytest.mark.parametrize("scale,keep", [(1.0, False), (0.6, True)])
@pytest.mark.parametrize("code,shape,axis", [c for c in CASES if c[0] == "BF16"])
def test_widening_back_from_the_rounding_equals_reading_the_stored_bytes(code, shape, axis, scale, keep, monkeypatch):
    """The kernels widen what they stored back from the rounding's scratch when the block holds no NaN: the same
    values as decoding the stored bytes, so the same bytes, the same second pass and the same statistics."""
    u = _unit(shape[axis], seed=13)
    floor = noise_floor(TORCH[code], shape[axis])
    w = _writer(shape, u, axis, seed=17, floor=floor).to(TORCH[code])
    fast, slow = _stored(w, code), _stored(w, code)
    fast_stats = kernels.project_along(fast, code, u.numpy(), axis, floor, scale=scale, preserve_norm=keep)
    monkeypatch.setattr(kernels, "_finite", lambda *arrays: False)  # every block takes the decoding path
    slow_stats = kernels.project_along(slow, code, u.numpy(), axis, floor, scale=scale, preserve_norm=keep)
    assert np.array_equal(fast, slow)
    assert fast_stats == slow_stats


def test_streamed_columns_match_the_matrix_held_whole_including_a_second_pass():
    """Columns almost parallel to u need a second update pass, which starts from the rows written first."""
    g = torch.Generator().manual_seed(0)
    d, m = 64, 32
    ut = torch.randn(d, generator=g)
    ut /= ut.norm()
    matrix = (ut[:, None] * 1e3 + torch.randn(d, m, generator=g) * 1e-3).numpy()
    u = ut.numpy()
    floor = noise_floor(torch.float32, d)
    src, dst = matrix.copy(), np.full_like(matrix, np.nan)
    passes: list[bool] = []

    def read(i0, i1, updated):
        passes.append(updated)
        return (dst if updated else src)[i0:i1].copy()  # a copy, as a read from a file is

    def write(i0, rows):
        dst[i0 : i0 + rows.shape[0]] = rows

    streamed = kernels.project_columns_streamed(d, m, "F32", u, floor, read=read, write=write, block_elems=256)
    whole = matrix.copy()
    reference = kernels.project_columns(whole, "F32", u, floor, block_elems=256)
    assert True in passes, "the second pass did not run: the test lost its point"
    assert np.array_equal(dst, whole)
    assert streamed == reference
    assert np.array_equal(src, matrix)
    assert streamed.relative_residual <= floor


def test_post_norm_target_matches_torch():
    from weightedit.edit.projection import effective_direction

    g = torch.Generator().manual_seed(2)
    r = torch.randn(32, generator=g)
    r = r / r.norm()
    gamma = torch.rand(32, generator=g) + 0.5
    want = effective_direction(r, gamma, 1.0)
    got = kernels.effective_vector(r.numpy(), gamma.numpy(), 1.0)
    assert np.allclose(got, want.numpy(), rtol=0, atol=1e-6)
    assert not kernels.effective_vector(r.numpy(), -np.ones(32, np.float32), 1.0).any()


@pytest.mark.parametrize(
    "vector,match",
    [
        (np.ones((2, 8)), "shape"),
        (np.ones(7), "d_model=8"),
        (np.array([np.nan] + [1.0] * 7), "non-finite"),
        (np.zeros(8), "zero norm"),
    ],
)
def test_unit_vector_names_the_problem(vector, match):
    with pytest.raises(InvalidDirectionError, match=match):
        kernels.unit_vector(vector, 8)
