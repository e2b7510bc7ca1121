"""The output shards as spans, and the lanes that write them; nothing here imports torch.

Each output shard is described by a :class:`ShardJob`: its header and, in file order, the byte ranges of
the input that are copied unchanged (:class:`CopySpan`) or edited (:class:`EditSpan`: a block of rows, one
``[d, m]`` matrix, or a small whole tensor). Every span's place in the output is known from the header, so
the spans can be written in any order, by any lane, with positional writes.

:class:`Pipeline` runs the lanes. It starts as soon as the headers are planned: the output files are created
with their headers and a first lane copies the untouched bytes (``copy_file_range`` inside the kernel) while the
calling thread computes each writer's target (post-norm writers read their norm weights). :meth:`Pipeline.finish`
then hands both lanes an editor
(:mod:`weightedit.edit.writer`): the calling thread takes edit spans from the last one backwards, the first lane
carries on with whatever is left from the front, so the two lanes mostly write different files and do not wait
on each other's file locks. Nothing here or in the editor imports torch.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidCheckpointError, WriteFailedError
from ..io.atomic import deferred_signals

__all__ = [
    "CopySpan",
    "EditSpan",
    "ShardJob",
    "Sample",
    "Pipeline",
    "Editor",
    "check_samples",
    "pwrite_all",
    "read_into",
    "noise_floor_for",
    "NOISE_FACTOR",
]

_SAMPLE_BYTES = 64  # bytes kept per sample point for the check before the rename
# Errors that mean "this kernel copy does not work between these two files", not "the copy failed".
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_FALLBACK_CHUNK = 8 << 20
_COPY_CHUNK = 256 << 20  # bytes per kernel copy call: a cancelled edit stops within one of these

# Indirections so that tests can inject short writes and failures into exactly these calls.
_os_pwrite = os.pwrite
_os_copy_file_range = getattr(os, "copy_file_range", None)
_os_sendfile = os.sendfile


def _libc_sync_file_range() -> Any:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux (or no such call): the per-shard fsync does all the flushing
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _libc_fallocate() -> Any:
    try:
        call = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return call


_fallocate = _libc_fallocate()
_FALLOC_FL_KEEP_SIZE = 1


def reserve(fd: int, length: int) -> None:
    """Allocate the disk blocks of a file's first ``length`` bytes now, keeping its size (``fallocate`` with
    ``FALLOC_FL_KEEP_SIZE``): the lanes then write into blocks that exist, instead of the filesystem allocating
    them while it writes back what the lanes wrote, and a disk that cannot hold the file says so before anything
    is written. Advisory like :func:`start_writeback`: a filesystem without it allocates as it goes.

    Raises:
        OSError: ``ENOSPC`` (or ``EDQUOT``) when the disk cannot hold the file.
    """
    if _fallocate is None or length <= 0:
        return
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, length) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk now, without waiting.

    Advisory (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no durability, no metadata): the disk works while
    the lanes go on, so the ``fsync`` of a finished shard has little left to do. Without it a single-file
    checkpoint is flushed all at once after the last byte is written, as ``cp`` + ``sync`` does (0.5-1 s on the
    demo model: the README's "Benchmarks"). Failures are ignored: the fsync before
    the rename is what makes the output durable.
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# Machine epsilon of the float dtypes a writer can have (safetensors codes), and the margin over rounding noise
# below which a component counts as removed (see :func:`weightedit.edit.projection.noise_floor`).
_EPS = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
NOISE_FACTOR = 8.0


def noise_floor_for(dtype: str, d_model: int) -> float:
    """:func:`weightedit.edit.projection.noise_floor` for a safetensors dtype code, without torch."""
    return NOISE_FACTOR * _EPS[dtype] / math.sqrt(d_model)


@dataclass(frozen=True)
class CopySpan:
    """Bytes ``[offset, offset + length)`` of the input file, written unchanged."""

    offset: int
    length: int


@dataclass(frozen=True)
class EditSpan:
    """One block of a writer tensor at ``[offset, offset + length)`` of the input file.

    ``dtype`` is the tensor's safetensors code (``"BF16"``...). ``mode`` says how it is edited: ``"rows"``, a
    block of rows of a row-local tensor (embedding, Conv1D) read whole into the buffer
    (:func:`~weightedit.edit.kernels.project_rows`); ``"columns"``, one ``[d, m]`` matrix whose columns
    are edited (``nn.Linear``, one expert of a stack), streamed in cache-sized blocks of rows in two passes
    (:func:`~weightedit.edit.kernels.project_columns_streamed`); ``"whole"``, a small tensor edited along
    ``axis`` in the buffer (biases). ``scale`` and ``preserve_norm`` shape the edit
    (:mod:`weightedit.edit.profile`). The vector it is projected against is the editor's, by ``name``.
    """

    name: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
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

    def copy(
        self,
        src_fd: int,
        dst_fd: int,
        offset: int,
        length: int,
        dst_offset: int,
        src: Path,
        cancel: threading.Event | None = None,
    ) -> None:
        """Copy ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at ``dst_offset`` (stopping early,
        incomplete, once ``cancel`` is set)."""
        mode = "copy_file_range" if _os_copy_file_range is not None else "sendfile"
        done = 0
        while done < length:
            if cancel is not None and cancel.is_set():
                return
            want = min(length - done, _COPY_CHUNK)
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


def samples_for(length: int) -> list[int]:
    """Offsets within a span of ``length`` bytes where a sample is kept: start, middle and end."""
    if length <= _SAMPLE_BYTES:
        return [0] if length else []
    return sorted({0, (length // 2) & ~7, length - _SAMPLE_BYTES})


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
# The lanes
# ----------------------------------------------------------------------------------------------------------


class Editor(Protocol):
    """Edits one span: reads it from ``src_fd``, projects, writes it to ``dst_fd`` at ``pos``; returns its
    statistics (a :class:`~weightedit.edit.kernels.BlockStats`) and appends samples of what it wrote."""

    def __call__(
        self, src_fd: int, dst_fd: int, pos: int, job: ShardJob, span: EditSpan, samples: list[Sample]
    ) -> Any: ...


_Item = tuple[ShardJob, int, "CopySpan | EditSpan"]


class _Queue:
    """What the lanes share: the spans still to do (copies from the front; edits from either end), the
    per-shard byte counts and the statistics."""

    def __init__(self, jobs: Sequence[ShardJob], advance: Callable[[int], object]):
        self.copies: list[_Item] = []
        self.edits: list[_Item] = []
        for job in jobs:
            pos = len(job.header)
            for span in job.spans:
                (self.copies if isinstance(span, CopySpan) else self.edits).append((job, pos, span))
                pos += span.length
        self._copy_next = 0
        self._edit_front = 0
        self._edit_back = len(self.edits)
        self._left = {id(j): j.size - len(j.header) for j in jobs}
        self._lock = threading.Lock()
        self._advance = advance
        self.stats: dict[str, Any] = {}
        self.cancel = threading.Event()
        self.editing = threading.Event()  # set when the editors are ready (or when there will be none)
        self.on_done: Callable[[ShardJob], object] = lambda job: None

    def take_copy(self) -> _Item | None:
        with self._lock:
            if self._copy_next >= len(self.copies):
                return None
            self._copy_next += 1
            return self.copies[self._copy_next - 1]

    def take_edit(self, *, from_end: bool) -> _Item | None:
        with self._lock:
            if self._edit_front >= self._edit_back:
                return None
            if from_end:
                self._edit_back -= 1
                return self.edits[self._edit_back]
            self._edit_front += 1
            return self.edits[self._edit_front - 1]

    def merge(self, name: str, block_stats: Any) -> None:
        with self._lock:
            if name in self.stats:
                self.stats[name].merge(block_stats)
            else:
                self.stats[name] = block_stats

    def wrote(self, job: ShardJob, n: int) -> None:
        with self._lock:
            self._left[id(job)] -= n
            done = n > 0 and self._left[id(job)] == 0
        self._advance(n)
        if done:
            self.on_done(job)


class _Lane:
    """One lane: its open files and copier; copies until it has an editor, then edits too."""

    def __init__(self, queue: _Queue) -> None:
        self._queue = queue
        self._copier = _Copier()
        self._fds: dict[tuple[Path, int], int] = {}
        self.samples: list[Sample] = []
        self.editor: Editor | None = None

    def _fd(self, path: Path, flags: int) -> int:
        key = (path, flags)
        if key not in self._fds:
            self._fds[key] = os.open(path, flags)
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def run(self, *, edits_first: bool, make_editor: Callable[[], Editor | None]) -> None:
        """Take spans until none are left: copies (and then edits), or edits from the end (and then copies)."""
        queue = self._queue
        while not queue.cancel.is_set():
            item = queue.take_edit(from_end=True) if edits_first else queue.take_copy()
            if item is None and edits_first:
                item = queue.take_copy()
            if item is None and not edits_first:
                queue.editing.wait()
                if queue.cancel.is_set():
                    return
                if self.editor is None:
                    self.editor = make_editor()
                item = queue.take_edit(from_end=False) if self.editor is not None else None
            if item is None:
                return
            self._do(item)

    def _do(self, item: _Item) -> None:
        job, pos, span = item
        src_fd = self._fd(job.src, os.O_RDONLY)
        if isinstance(span, CopySpan):
            dst_fd = self._fd(job.dest, os.O_WRONLY)
            self._copier.copy(src_fd, dst_fd, span.offset, span.length, pos, job.src, self._queue.cancel)
            if self._queue.cancel.is_set():
                return
            for k in samples_for(span.length):
                n = min(_SAMPLE_BYTES, span.length - k)
                self.samples.append(Sample(job.dest, pos + k, n, src=job.src, src_offset=span.offset + k))
        else:
            assert self.editor is not None  # edits are taken only by a lane that has an editor
            dst_fd = self._fd(job.dest, os.O_RDWR)
            self._queue.merge(span.name, self.editor(src_fd, dst_fd, pos, job, span, self.samples))
        start_writeback(dst_fd, pos, span.length)
        self._queue.wrote(job, span.length)


class Pipeline:
    """Writes the shards of ``jobs``: :meth:`start` copies in the background, :meth:`finish` edits and joins.

    Args:
        jobs: the shards to write; each ``dest`` must not exist yet. :meth:`start` creates it with its header.
        advance: called with each span's byte count once it is written (progress; from either lane).
        on_shard_written: called with each complete shard's path, header included (e.g. to flush it).
    """

    def __init__(
        self,
        jobs: Sequence[ShardJob],
        *,
        advance: Callable[[int], object] = lambda n: None,
        on_shard_written: Callable[[Path], object] = lambda p: None,
    ) -> None:
        self.jobs = list(jobs)
        self._on_shard_written = on_shard_written
        self._queue = _Queue(self.jobs, advance)
        self._queue.on_done = self._shard_done
        self._lanes = [_Lane(self._queue), _Lane(self._queue)]
        self._make_editor: Callable[[], Editor | None] = lambda: None
        self._thread: threading.Thread | None = None
        self._failure: list[BaseException] = []

    def _shard_done(self, job: ShardJob) -> None:
        size = os.stat(job.dest).st_size
        if size != job.size:
            raise WriteFailedError(
                f"writing {job.dest.name} produced {size} bytes instead of {job.size}: the output filesystem "
                "lost data; choose another <<out>>; nothing was written",
                path=job.dest,
                option="out",
            )
        self._on_shard_written(job.dest)

    @property
    def failure(self) -> BaseException | None:
        """What stopped the first lane, if anything did."""
        return self._failure[0] if self._failure else None

    def start(self) -> Pipeline:
        """Create every output file with its header and start the first lane on the copy spans (call
        :meth:`cancel` on any failure after this, even one raised by this call)."""
        for job in self.jobs:
            fd = os.open(job.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                reserve(fd, job.size)
                pwrite_all(fd, job.header, 0)
            finally:
                os.close(fd)
            if job.size == len(job.header):  # nothing but a header: complete now
                self._shard_done(job)

        def first_lane() -> None:
            try:
                self._lanes[0].run(edits_first=False, make_editor=lambda: self._make_editor())
            except BaseException as e:  # re-raised by the calling thread
                self._failure.append(e)
                self._queue.cancel.set()
            finally:
                self._lanes[0].close()

        thread = threading.Thread(target=first_lane, name="weightedit-edit", daemon=True)
        # A signal while the thread starts would leave a thread that cancel() cannot join ("not started"): it is
        # held back until the thread is running and recorded, then delivered.
        with deferred_signals():
            thread.start()
            self._thread = thread
        return self

    def finish(self, make_editor: Callable[[], Editor | None]) -> tuple[dict[str, Any], list[Sample]]:
        """Edit with both lanes and wait for all spans.

        ``make_editor`` is called once in each lane's thread (editors keep per-thread buffers).

        Returns:
            The statistics of each edited tensor (merged from its spans) and the samples to check with
            :func:`check_samples`.

        Raises:
            OSError: a read or write failed; ``ENOSPC``/``EFBIG``/``EDQUOT`` when the disk is full.
            WriteFailedError: a shard came out with another size than its header says.
            InvalidCheckpointError: an input file ended early.
        """
        try:
            assert self._thread is not None, "start() first"
            if self._failure:  # the first lane failed while the caller was getting ready: that error first
                raise self._failure[0]
            self._make_editor = make_editor
            self._queue.editing.set()
            lane = self._lanes[1]
            try:
                lane.editor = make_editor()
                lane.run(edits_first=True, make_editor=make_editor)
            finally:
                lane.close()
            self._thread.join()
        except BaseException:
            self.cancel()
            raise
        if self._failure:
            raise self._failure[0]
        return self._queue.stats, self._lanes[0].samples + self._lanes[1].samples

    def cancel(self) -> None:
        """Stop both lanes and wait for the first (on any failure, before the output folder is removed).

        The first lane stops within one kernel copy call (256 MiB); a second Ctrl-C meanwhile does not cut the
        wait short, so nothing writes into the output folder once it is being removed.
        """
        self._queue.cancel.set()
        self._queue.editing.set()
        if self._thread is not None:
            with deferred_signals(deliver=False):
                self._thread.join()
