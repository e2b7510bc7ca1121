"""The edit lanes of the streaming writer: each span read in cache-sized blocks, projected, written back.

The spans, the checked I/O and the two lanes that take spans from a shared list live in
:mod:`weightedit.edit.spans`; this module is the :class:`SpanEditor` each lane gets
(:meth:`~weightedit.edit.spans.Pipeline.finish` with :func:`editor_factory`). Neither imports torch: the
arithmetic is :mod:`weightedit.edit.kernels` (NumPy), so a lane starts editing as soon as the direction's
vector is read, a fraction of a second after the command starts.

An edit span is read into the lane's own small buffers, the direction is projected out, and the blocks are
written back at their offsets; a sample of the written bytes is kept so that the caller can compare the file
against what was computed before the output is renamed into place. Memory is two small buffers per lane
whatever the model size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..io.floats import as_stored
from . import spans
from .kernels import BlockStats, column_block_rows, project_along, project_columns_streamed, project_rows
from .spans import EditSpan, Sample, ShardJob, samples_for

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["SpanEditor", "editor_factory", "buffer_sizes", "single_threaded_blas"]

_SAMPLE_BYTES = spans._SAMPLE_BYTES


def buffer_sizes(jobs: Sequence[ShardJob]) -> tuple[int, int]:
    """Bytes of each lane's two buffers: the longest ``"rows"``/``"whole"`` span, and the rows of one
    cache-sized block of the widest ``"columns"`` span (see :func:`project_columns_streamed`)."""
    edits = [s for j in jobs for s in j.spans if isinstance(s, EditSpan)]
    slab = max((s.length for s in edits if s.mode != "columns"), default=0)
    columns = max(
        (column_block_rows(s.shape[1]) * (s.length // s.shape[0]) for s in edits if s.mode == "columns" and s.shape[0]),
        default=0,
    )
    return slab, columns


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """NumPy's BLAS limited to one thread meanwhile: each lane is one thread already, and the BLAS library's
    own threads would only compete with the other lane for the cores (and spin while they wait).

    Speed only: without threadpoolctl (an environment installed before it was a dependency) the edit runs as it
    is, with the same bytes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class SpanEditor:
    """Edits spans against ``targets`` (tensor name -> unit float32 vector) with this lane's own buffers."""

    def __init__(self, targets: Mapping[str, NDArray], slab_bytes: int, column_bytes: int) -> None:
        self._targets = targets
        self._slab = np.empty(slab_bytes, dtype=np.uint8) if slab_bytes else None
        self._columns = np.empty(column_bytes, dtype=np.uint8) if column_bytes else None

    def __call__(
        self, src_fd: int, dst_fd: int, pos: int, job: ShardJob, span: EditSpan, samples: list[Sample]
    ) -> BlockStats:
        if span.mode == "columns":
            return self._edit_columns(src_fd, dst_fd, pos, job, span, samples)
        return self._edit_in_buffer(src_fd, dst_fd, pos, job, span, samples)

    def _edit_in_buffer(
        self, src_fd: int, dst_fd: int, pos: int, job: ShardJob, span: EditSpan, samples: list[Sample]
    ) -> BlockStats:
        assert self._slab is not None
        raw = self._slab[: span.length]
        view = raw.data
        spans.read_into(src_fd, view, span.offset, job.src)
        tensor = as_stored(raw, span.dtype, span.shape)
        u = self._targets[span.name]
        if span.mode == "rows":
            block_stats = project_rows(
                tensor.reshape(-1, span.shape[-1]),
                span.dtype,
                u,
                span.floor,
                scale=span.scale,
                preserve_norm=span.preserve_norm,
            )
        else:
            block_stats = project_along(
                tensor, span.dtype, u, span.axis, span.floor, scale=span.scale, preserve_norm=span.preserve_norm
            )
        for k in samples_for(span.length):
            n = min(_SAMPLE_BYTES, span.length - k)
            samples.append(Sample(job.dest, pos + k, n, expected=bytes(view[k : k + n])))
        spans.pwrite_all(dst_fd, view, pos)
        return block_stats

    def _edit_columns(
        self, src_fd: int, dst_fd: int, pos: int, job: ShardJob, span: EditSpan, samples: list[Sample]
    ) -> BlockStats:
        buffer = self._columns
        assert buffer is not None
        d, m = span.shape
        row_bytes = span.length // d
        written: dict[int, Sample] = {}

        def read(i0: int, i1: int, updated: bool) -> NDArray:
            raw = buffer[: (i1 - i0) * row_bytes]
            if updated:  # a second update pass starts from what the first one wrote
                spans.read_into(dst_fd, raw.data, pos + i0 * row_bytes, job.dest)
            else:
                spans.read_into(src_fd, raw.data, span.offset + i0 * row_bytes, job.src)
            return as_stored(raw, span.dtype, (i1 - i0, m))

        def write(i0: int, rows: NDArray) -> None:
            view = rows.reshape(-1).view(np.uint8).data
            at = pos + i0 * row_bytes
            spans.pwrite_all(dst_fd, view, at)
            n = min(_SAMPLE_BYTES, len(view))
            written[at] = Sample(job.dest, at, n, expected=bytes(view[:n]))
            if at + len(view) == pos + span.length and len(view) > n:
                end = at + len(view) - n
                written[end] = Sample(job.dest, end, n, expected=bytes(view[len(view) - n :]))

        block_stats = project_columns_streamed(
            d,
            m,
            span.dtype,
            self._targets[span.name],
            span.floor,
            read=read,
            write=write,
            scale=span.scale,
            preserve_norm=span.preserve_norm,
        )
        if not written and span.length:  # nothing changed: the input's bytes go out as they are
            raw = buffer[: min(len(buffer) // row_bytes * row_bytes, span.length)]
            done = 0
            while done < span.length:
                n = min(len(raw), span.length - done)
                spans.read_into(src_fd, raw[:n].data, span.offset + done, job.src)
                write(done // row_bytes, as_stored(raw[:n], span.dtype, (n // row_bytes, m)))
                done += n
        samples.extend(written.values())
        return block_stats


def editor_factory(jobs: Sequence[ShardJob], targets: Mapping[str, NDArray]) -> Callable[[], SpanEditor]:
    """What :meth:`Pipeline.finish` calls in each lane: a :class:`SpanEditor` with buffers sized for ``jobs``."""
    slab, columns = buffer_sizes(jobs)
    return lambda: SpanEditor(targets, slab, columns)
