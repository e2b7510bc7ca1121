"""The edit lanes of the streaming writer: each span read in cache-sized blocks, projected, written back.

The spans, the checked I/O and the two lanes that take spans from a shared list live in
:mod:`weightedit.edit.spans`, which needs no torch, so copying can start before torch is imported. This module
is the part that needs it: the :class:`SpanEditor` each lane gets once torch is ready
(:meth:`~weightedit.edit.spans.Pipeline.finish` with :func:`editor_factory`).

An edit span is read into the lane's own small buffers, the direction is projected out, and the blocks are
written back at their offsets; a sample of the written bytes is kept so that the caller can compare the file
against what was computed before the output is renamed into place. Memory is two small buffers per lane
whatever the model size.

PyTorch runs single-threaded in both lanes: its operations on cache-sized blocks are too small to gain
from more threads, and on a busy machine its idle threads spin and burn CPU time the lanes need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..io.checkpoint import torch_dtype_of
from . import spans
from .projection import BlockStats, column_block_rows, project_columns_streamed, project_out_, project_rows_
from .spans import EditSpan, Sample, ShardJob, samples_for

__all__ = ["SpanEditor", "editor_factory", "buffer_sizes"]

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


class SpanEditor:
    """Edits spans against ``targets`` (tensor name -> unit vector) with this lane's own buffers."""

    def __init__(self, targets: Mapping[str, torch.Tensor], slab_bytes: int, column_bytes: int) -> None:
        torch.set_num_threads(1)  # per thread: PyTorch's own threads would only spin on these small blocks
        self._targets = targets
        self._slab = torch.empty(slab_bytes, dtype=torch.uint8) if slab_bytes else None
        self._columns = torch.empty(column_bytes, dtype=torch.uint8) if column_bytes else None

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
        view = raw.numpy().data
        spans.read_into(src_fd, view, span.offset, job.src)
        tensor = raw.view(_dtype(span.dtype)).view(span.shape)
        u = self._targets[span.name]
        if span.mode == "rows":
            block_stats = project_rows_(
                tensor.view(-1, span.shape[-1]), u, span.floor, scale=span.scale, preserve_norm=span.preserve_norm
            )
        else:
            block_stats = project_out_(
                tensor, u, span.axis, floor=span.floor, scale=span.scale, preserve_norm=span.preserve_norm
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
        dtype = _dtype(span.dtype)
        row_bytes = span.length // d
        written: dict[int, Sample] = {}

        def read(i0: int, i1: int, updated: bool) -> torch.Tensor:
            raw = buffer[: (i1 - i0) * row_bytes]
            if updated:  # a second update pass starts from what the first one wrote
                spans.read_into(dst_fd, raw.numpy().data, pos + i0 * row_bytes, job.dest)
            else:
                spans.read_into(src_fd, raw.numpy().data, span.offset + i0 * row_bytes, job.src)
            return raw.view(dtype).view(i1 - i0, m)

        def write(i0: int, rows: torch.Tensor) -> None:
            view = rows.view(torch.uint8).numpy().data.cast("B")
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
            dtype,
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
                spans.read_into(src_fd, raw.numpy().data[:n], span.offset + done, job.src)
                write(done // row_bytes, raw[:n].view(dtype).view(n // row_bytes, m))
                done += n
        samples.extend(written.values())
        return block_stats


def _dtype(code: str) -> torch.dtype:
    dtype = torch_dtype_of(code)
    assert dtype is not None  # plan_edit refuses writers of other dtypes
    return dtype


def editor_factory(jobs: Sequence[ShardJob], targets: Mapping[str, torch.Tensor]) -> Callable[[], SpanEditor]:
    """What :meth:`Pipeline.finish` calls in each lane: a :class:`SpanEditor` with buffers sized for ``jobs``."""
    slab, columns = buffer_sizes(jobs)
    return lambda: SpanEditor(targets, slab, columns)
