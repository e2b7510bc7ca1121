"""The streaming shard writer: two lanes that fill each output shard at known offsets.

Each output shard is described by a :class:`ShardJob`: its header and, in file order, the byte ranges of
the input that are copied unchanged (:class:`CopySpan`) or edited (:class:`EditSpan`: a block of rows, one
``[d, m]`` matrix, or a small whole tensor). Every span's place in the output is known from the header, so
the output files are created with their headers first and two lanes (the calling thread and one worker)
then take spans in file order from one shared list and write them with positional writes:

- a copy span is copied inside the kernel (``copy_file_range``, then ``sendfile``, then
  ``pread``/``pwrite`` where neither works between the two files);
- an edit span is read in cache-sized blocks into the lane's own small buffers, the direction is projected
  out, and the blocks are written back at their offsets.

On two cores the lanes balance themselves (whichever is free takes the next span), so reading, computing
and writing overlap and the wall time approaches half the work, not all of it. Memory is two small buffers
per lane whatever the model size. Every write's byte count is checked (a short write is continued; a write
that makes no progress is a full disk), a shard counts as written only when all of its bytes are and its
size is what its header says, and a sample of written bytes is kept so that the caller can compare the
file against what was computed before the output is renamed into place.

PyTorch runs single-threaded in both lanes: its operations on cache-sized blocks are too small to gain
from more threads, and on a busy machine its idle threads spin and burn CPU time the lanes need.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidCheckpointError, WriteFailedError
from ..io.hashing import sha256_file
from .projection import BlockStats, column_block_rows, project_columns_streamed, project_out_, project_rows_

__all__ = [
    "CopySpan",
    "EditSpan",
    "ShardJob",
    "Sample",
    "write_shards",
    "check_samples",
    "InputHasher",
    "pwrite_all",
    "read_into",
]

_SAMPLE_BYTES = 64  # bytes kept per sample point for the check before the rename
# Errors that mean "this kernel copy does not work between these two files", not "the copy failed".
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_FALLBACK_CHUNK = 8 << 20

# Indirections so that tests can inject short writes and failures into exactly these calls.
_os_pwrite = os.pwrite
_os_copy_file_range = getattr(os, "copy_file_range", None)
_os_sendfile = os.sendfile


@dataclass(frozen=True)
class CopySpan:
    """Bytes ``[offset, offset + length)`` of the input file, written unchanged."""

    offset: int
    length: int


@dataclass(frozen=True)
class EditSpan:
    """One block of a writer tensor at ``[offset, offset + length)`` of the input file.

    ``mode`` says how it is edited: ``"rows"``, a block of rows of a row-local tensor (embedding, Conv1D)
    read whole into the buffer (:func:`~weightedit.edit.project_rows_`); ``"columns"``, one ``[d, m]``
    matrix whose columns are edited (``nn.Linear``, one expert of a stack), streamed in cache-sized blocks
    of rows in two passes (:func:`~weightedit.edit.project_columns_streamed`); ``"whole"``, a small
    tensor edited along ``axis`` in the buffer (biases). ``scale`` and ``preserve_norm`` shape the edit
    (:mod:`weightedit.edit.profile`).
    """

    name: str
    offset: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    u: torch.Tensor
    axis: int
    floor: float
    mode: str
    scale: float = 1.0
    preserve_norm: bool = False


@dataclass
class ShardJob:
    """One output shard: write ``header``, then every span of ``src`` in order."""

    src: Path
    dest: Path
    header: bytes
    spans: list[CopySpan | EditSpan]

    @property
    def size(self) -> int:
        return len(self.header) + sum(s.length for s in self.spans)


@dataclass(frozen=True)
class Sample:
    """Bytes the output ``dest`` must hold at ``offset``: ``expected`` (computed), or those of ``src`` at ``src_offset``."""

    dest: Path
    offset: int
    length: int
    expected: bytes | None = None
    src: Path | None = None
    src_offset: int = 0


# ----------------------------------------------------------------------------------------------------------
# Checked I/O
# ----------------------------------------------------------------------------------------------------------


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of ``data`` to ``fd`` at ``offset``, continuing after short writes; return the byte count.

    Raises:
        OSError: with ``ENOSPC`` when a write makes no progress (the disk is full), or whatever the
            kernel reported (``ENOSPC``, ``EFBIG``, ``EDQUOT``, ``EIO`` ...).
    """
    view = memoryview(data).cast("B")
    total = len(view)
    done = 0
    while done < total:
        n = _os_pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return total


def read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``, continuing after short reads.

    Raises:
        InvalidCheckpointError: the file ends before ``view`` is full (it shrank after its header was read).
    """
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise InvalidCheckpointError(
                f"{path} ended at byte {offset + got} while it was being read: the file changed or is truncated; "
                "re-download it",
                path=path,
            )
        got += n


class _Copier:
    """Copies byte ranges between two files with the cheapest call that works for that pair of files."""

    def __init__(self) -> None:
        self._buffer: bytearray | None = None

    def copy(self, src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int, src: Path) -> None:
        """Copy ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at ``dst_offset``."""
        mode = "copy_file_range" if _os_copy_file_range is not None else "sendfile"
        done = 0
        while done < length:
            want = length - done
            if mode == "copy_file_range":
                assert _os_copy_file_range is not None  # the mode starts here only where the call exists
                try:
                    n = _os_copy_file_range(src_fd, dst_fd, want, offset + done, dst_offset + done)
                except OSError as e:
                    if e.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    mode = "sendfile"  # e.g. EXDEV: the two files are on different filesystems
                    continue
            elif mode == "sendfile":
                try:
                    os.lseek(dst_fd, dst_offset + done, os.SEEK_SET)  # sendfile writes at the file position
                    n = _os_sendfile(dst_fd, src_fd, offset + done, want)
                except OSError as e:
                    if e.errno not in _NO_SENDFILE:
                        raise
                    mode = "pread"
                    continue
            else:
                if self._buffer is None:
                    self._buffer = bytearray(_FALLBACK_CHUNK)
                view = memoryview(self._buffer)[: min(want, _FALLBACK_CHUNK)]
                n = os.preadv(src_fd, [view], offset + done)
                if n:
                    pwrite_all(dst_fd, view[:n], dst_offset + done)
            if n == 0:
                raise InvalidCheckpointError(
                    f"{src} ended at byte {offset + done} while it was being copied: the file changed or is "
                    "truncated; re-download it",
                    path=src,
                )
            done += n


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------


def _samples_for(length: int) -> list[int]:
    """Offsets within a span of ``length`` bytes where a sample is kept: start, middle and end."""
    if length <= _SAMPLE_BYTES:
        return [0] if length else []
    return sorted({0, (length // 2) & ~7, length - _SAMPLE_BYTES})


class _Worker:
    """One of the two lanes: its own buffers, open files and copier; takes spans from the shared list."""

    def __init__(self, slab_bytes: int, column_bytes: int, shared: _Shared) -> None:
        self._slab = torch.empty(slab_bytes, dtype=torch.uint8) if slab_bytes else None
        self._columns = torch.empty(column_bytes, dtype=torch.uint8) if column_bytes else None
        self._shared = shared
        self._copier = _Copier()
        self._fds: dict[tuple[Path, int], int] = {}
        self.samples: list[Sample] = []

    def _fd(self, path: Path, flags: int) -> int:
        key = (path, flags)
        if key not in self._fds:
            self._fds[key] = os.open(path, flags)
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def run(self) -> None:
        shared = self._shared
        while not shared.cancel.is_set():
            item = shared.take()
            if item is None:
                return
            job, pos, span = item
            src_fd = self._fd(job.src, os.O_RDONLY)
            if isinstance(span, CopySpan):
                dst_fd = self._fd(job.dest, os.O_WRONLY)
                self._copier.copy(src_fd, dst_fd, span.offset, span.length, pos, job.src)
                for k in _samples_for(span.length):
                    n = min(_SAMPLE_BYTES, span.length - k)
                    self.samples.append(Sample(job.dest, pos + k, n, src=job.src, src_offset=span.offset + k))
            else:
                dst_fd = self._fd(job.dest, os.O_RDWR)
                if span.mode == "columns":
                    block_stats = self._edit_columns(src_fd, dst_fd, pos, job, span)
                else:
                    block_stats = self._edit_in_buffer(src_fd, dst_fd, pos, job, span)
                shared.merge(span.name, block_stats)
            shared.wrote(job, span.length)

    def _edit_in_buffer(self, src_fd: int, dst_fd: int, pos: int, job: ShardJob, span: EditSpan) -> BlockStats:
        assert self._slab is not None
        raw = self._slab[: span.length]
        view = raw.numpy().data
        read_into(src_fd, view, span.offset, job.src)
        tensor = raw.view(span.dtype).view(span.shape)
        if span.mode == "rows":
            block_stats = project_rows_(
                tensor.view(-1, span.shape[-1]), span.u, span.floor, scale=span.scale, preserve_norm=span.preserve_norm
            )
        else:
            block_stats = project_out_(
                tensor, span.u, span.axis, floor=span.floor, scale=span.scale, preserve_norm=span.preserve_norm
            )
        for k in _samples_for(span.length):
            n = min(_SAMPLE_BYTES, span.length - k)
            self.samples.append(Sample(job.dest, pos + k, n, expected=bytes(view[k : k + n])))
        pwrite_all(dst_fd, view, pos)
        return block_stats

    def _edit_columns(self, src_fd: int, dst_fd: int, pos: int, job: ShardJob, span: EditSpan) -> BlockStats:
        buffer = self._columns
        assert buffer is not None
        d, m = span.shape
        row_bytes = span.length // d
        written: dict[int, Sample] = {}

        def read(i0: int, i1: int, updated: bool) -> torch.Tensor:
            raw = buffer[: (i1 - i0) * row_bytes]
            if updated:  # a second update pass starts from what the first one wrote
                read_into(dst_fd, raw.numpy().data, pos + i0 * row_bytes, job.dest)
            else:
                read_into(src_fd, raw.numpy().data, span.offset + i0 * row_bytes, job.src)
            return raw.view(span.dtype).view(i1 - i0, m)

        def write(i0: int, rows: torch.Tensor) -> None:
            view = rows.view(torch.uint8).numpy().data.cast("B")
            at = pos + i0 * row_bytes
            pwrite_all(dst_fd, view, at)
            n = min(_SAMPLE_BYTES, len(view))
            written[at] = Sample(job.dest, at, n, expected=bytes(view[:n]))
            if at + len(view) == pos + span.length and len(view) > n:
                end = at + len(view) - n
                written[end] = Sample(job.dest, end, n, expected=bytes(view[len(view) - n :]))

        block_stats = project_columns_streamed(
            d,
            m,
            span.dtype,
            span.u,
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
                read_into(src_fd, raw.numpy().data[:n], span.offset + done, job.src)
                write(done // row_bytes, raw[:n].view(span.dtype).view(n // row_bytes, m))
                done += n
        self.samples.extend(written.values())
        return block_stats


class _Shared:
    """What the two lanes share: the list of spans still to do, the per-shard byte counts, the statistics."""

    def __init__(
        self, jobs: Sequence[ShardJob], advance: Callable[[int], object], on_done: Callable[[ShardJob], object]
    ):
        self._items: list[tuple[ShardJob, int, CopySpan | EditSpan]] = []
        for job in jobs:
            pos = len(job.header)
            for span in job.spans:
                self._items.append((job, pos, span))
                pos += span.length
        self._next = 0
        self._left = {id(j): j.size - len(j.header) for j in jobs}
        self._lock = threading.Lock()
        self._advance = advance
        self._on_done = on_done
        self.stats: dict[str, BlockStats] = {}
        self.cancel = threading.Event()

    def take(self) -> tuple[ShardJob, int, CopySpan | EditSpan] | None:
        with self._lock:
            if self._next >= len(self._items):
                return None
            self._next += 1
            return self._items[self._next - 1]

    def merge(self, name: str, block_stats: BlockStats) -> None:
        with self._lock:
            self.stats.setdefault(name, BlockStats()).merge(block_stats)

    def wrote(self, job: ShardJob, n: int) -> None:
        with self._lock:
            self._left[id(job)] -= n
            done = self._left[id(job)] == 0
        self._advance(n)
        if done:
            self._on_done(job)


def write_shards(
    jobs: Sequence[ShardJob],
    *,
    slab_bytes: int,
    advance: Callable[[int], object] = lambda n: None,
    on_shard_written: Callable[[Path], object] = lambda p: None,
) -> tuple[dict[str, BlockStats], list[Sample]]:
    """Write every job's shard with two lanes (this thread and a worker) taking spans in file order.

    Args:
        jobs: the shards to write; each ``dest`` must not exist yet.
        slab_bytes: size of each lane's edit buffer; at least the longest ``"rows"``/``"whole"`` span.
        advance: called with each span's byte count once it is written (progress; from either lane).
        on_shard_written: called with each complete shard's path (e.g. to flush it in the background).

    Returns:
        The edit statistics of each writer tensor, and the samples to check with :func:`check_samples`.

    Raises:
        OSError: a read or write failed; ``ENOSPC``/``EFBIG``/``EDQUOT`` when the disk is full.
        WriteFailedError: a shard came out with another size than its header says.
        InvalidCheckpointError: an input file ended early.
    """
    edits = [s for j in jobs for s in j.spans if isinstance(s, EditSpan)]
    longest = max((s.length for s in edits if s.mode != "columns"), default=0)
    if longest > slab_bytes:
        raise ValueError(f"slab_bytes={slab_bytes} is smaller than the longest edit span ({longest} bytes)")
    # The block buffer of column edits: the rows of one cache-sized block (see project_columns_streamed).
    column_bytes = max(
        (column_block_rows(s.shape[1]) * (s.length // s.shape[0]) for s in edits if s.mode == "columns" and s.shape[0]),
        default=0,
    )
    # Every output file gets its header first; the lanes then fill in the data at known offsets.
    for job in jobs:
        fd = os.open(job.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            pwrite_all(fd, job.header, 0)
        finally:
            os.close(fd)

    def shard_done(job: ShardJob) -> None:
        size = os.stat(job.dest).st_size
        if size != job.size:
            raise WriteFailedError(
                f"writing {job.dest.name} produced {size} bytes instead of {job.size}: the output filesystem "
                "lost data; choose another <<out>>; nothing was written",
                path=job.dest,
                option="out",
            )
        on_shard_written(job.dest)

    shared = _Shared(jobs, advance, shard_done)
    for job in jobs:
        if job.size == len(job.header):
            shard_done(job)
    lanes = [_Worker(longest, column_bytes, shared) for _ in range(2)]
    failure: list[BaseException] = []

    def second_lane() -> None:
        torch.set_num_threads(1)  # per thread: PyTorch's own threads would only spin on these small blocks
        try:
            lanes[1].run()
        except BaseException as e:  # re-raised by the calling thread
            failure.append(e)
            shared.cancel.set()
        finally:
            lanes[1].close()

    worker = threading.Thread(target=second_lane, name="weightedit-edit", daemon=True)
    worker.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lanes[0].run()
        worker.join()
    except BaseException:
        shared.cancel.set()
        raise
    finally:
        torch.set_num_threads(threads)
        lanes[0].close()
        worker.join()
    if failure:
        raise failure[0]
    return shared.stats, lanes[0].samples + lanes[1].samples


def check_samples(samples: Sequence[Sample]) -> int:
    """Re-read every sample from the output and compare it with what was computed or copied; return the count.

    Raises:
        InvalidCheckpointError: a sample differs (the written file is not what was computed).
    """
    fds: dict[Path, int] = {}
    try:
        for s in samples:
            for path in (s.dest, s.src):
                if path is not None and path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
            got = os.pread(fds[s.dest], s.length, s.offset)
            if s.expected is not None:
                want = s.expected
            else:
                assert s.src is not None  # a sample holds its expected bytes or where they were copied from
                want = os.pread(fds[s.src], s.length, s.src_offset)
            if got != want:
                raise InvalidCheckpointError(
                    f"verification failed: {s.dest.name} holds other bytes at offset {s.offset} than were "
                    f"{'computed' if s.expected is not None else 'copied'}; check the disk and run the edit again",
                    path=s.dest,
                )
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(samples)


# ----------------------------------------------------------------------------------------------------------
# Hashing the input for provenance
# ----------------------------------------------------------------------------------------------------------


class InputHasher:
    """SHA-256 of the input shards on a background thread, for provenance.

    A digest is not computed again when it is already known: files inside a Hub cache are named by it, and
    digests computed earlier are remembered by (path, size, mtime) in weightedit's cache
    (:func:`weightedit.hashing.known_sha256`). A file that cannot be read is an error of the edit.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        known: Callable[[Path], str | None] = lambda p: None,
        remember: Callable[[Path, str], object] = lambda p, d: None,
    ) -> None:
        self._paths = list(paths)
        self._known = known
        self._remember = remember
        self._hashes: dict[str, str] = {}
        self._computed: list[tuple[Path, str]] = []
        self._error: tuple[Path, OSError] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="weightedit-hash")
        self._thread.start()

    def _run(self) -> None:
        for path in self._paths:
            try:
                real = path.resolve()
                if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
                    self._hashes[path.name] = real.name
                    continue
                digest = self._known(path)
                if digest is None:
                    digest = sha256_file(path, stop=self._stop)
                    if digest is None:
                        return
                    self._computed.append((path, digest))
            except OSError as e:
                self._error = (path, e)
                return
            self._hashes[path.name] = digest

    def result(self) -> dict[str, str]:
        """The digest of every input file by name.

        Raises:
            InvalidCheckpointError: an input file could not be read.
        """
        self._thread.join()
        if self._error is not None:
            path, e = self._error
            raise InvalidCheckpointError(
                f"cannot read {path} to record its SHA-256: {e.strerror or e}; check the file and its permissions",
                path=path,
            )
        for path, digest in self._computed:
            with contextlib.suppress(OSError):  # a read-only cache only costs hashing again next time
                self._remember(path, digest)
        return {p.name: self._hashes[p.name] for p in self._paths}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
