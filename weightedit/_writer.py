"""The streaming shard writer: a bounded read → edit → write pipeline over the input's byte ranges.

Each output shard is described by a :class:`ShardJob`: its header and, in file order, the byte ranges of
the input that are copied unchanged (:class:`CopySpan`) or edited (:class:`EditSpan`, one block of rows or
one whole writer tensor). Two lanes run at once:

- the *edit lane* (a worker thread) reads each edit span into a reusable buffer with ``preadv``, projects
  the direction out in place, and hands the buffer on;
- the *write lane* (the calling thread) walks the spans in order, copies untouched ranges inside the
  kernel (``copy_file_range``, then ``sendfile``, then ``pread``/``write`` where neither works) and writes
  each edited buffer as soon as it is ready.

At most ``depth`` buffers of ``slab_bytes`` exist, so memory stays bounded by a few blocks whatever the model
size, while reading and computing the next block overlaps with writing the current one. Every write's byte
count is checked (a short write is continued; a write that makes no progress is a full disk), every output
file's final size is checked, and a sample of written bytes is kept so the caller can compare the file
against what was computed before the output is renamed into place.

PyTorch runs single-threaded on the edit lane: its operations on cache-sized blocks are too small to gain
from a second thread, and on a busy machine its idle threads spin and burn CPU time the copy needs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .edit import BlockStats, project_out_, project_rows_
from .errors import InvalidCheckpointError, WriteFailedError

__all__ = [
    "CopySpan",
    "EditSpan",
    "ShardJob",
    "Sample",
    "write_shards",
    "check_samples",
    "InputHasher",
    "write_all",
    "read_into",
]

_SAMPLE_BYTES = 64  # bytes kept per sample point for the check before the rename
# Errors that mean "this kernel copy does not work between these two files", not "the copy failed".
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_FALLBACK_CHUNK = 8 << 20

# Indirections so that tests can inject short writes and failures into exactly these calls.
_os_write = os.write
_os_copy_file_range = getattr(os, "copy_file_range", None)
_os_sendfile = os.sendfile


@dataclass(frozen=True)
class CopySpan:
    """Bytes ``[offset, offset + length)`` of the input file, written unchanged."""

    offset: int
    length: int


@dataclass(frozen=True)
class EditSpan:
    """One block of a writer tensor at ``[offset, offset + length)`` of the input file, edited in place.

    ``rows`` marks a block of rows of a row-local tensor (embedding, Conv1D), edited with
    :func:`~weightedit.edit.project_rows_`; otherwise the span is a whole tensor edited along ``axis``.
    """

    name: str
    offset: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    u: torch.Tensor
    axis: int
    floor: float
    rows: bool


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


class _Cancelled(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------
# Checked I/O
# ----------------------------------------------------------------------------------------------------------


def write_all(fd: int, data: bytes | memoryview) -> int:
    """Write all of ``data`` to ``fd``, continuing after short writes; return the byte count.

    Raises:
        OSError: with ``ENOSPC`` when a write makes no progress (the disk is full), or whatever the
            kernel reported (``ENOSPC``, ``EFBIG``, ``EDQUOT``, ``EIO`` ...).
    """
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        n = _os_write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
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
                "re-download it"
            )
        got += n


class _Copier:
    """Copies byte ranges between two files with the cheapest call that works for that pair of files."""

    def __init__(self) -> None:
        self._buffer: bytearray | None = None

    def copy(self, src_fd: int, dst_fd: int, offset: int, length: int, src: Path) -> None:
        """Append ``length`` bytes of ``src_fd`` from ``offset`` at the current position of ``dst_fd``."""
        mode = "copy_file_range" if _os_copy_file_range is not None else "sendfile"
        done = 0
        while done < length:
            want = length - done
            if mode == "copy_file_range":
                try:
                    n = _os_copy_file_range(src_fd, dst_fd, want, offset + done)  # type: ignore[misc]
                except OSError as e:
                    if e.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    mode = "sendfile"  # e.g. EXDEV: the two files are on different filesystems
                    continue
            elif mode == "sendfile":
                try:
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
                    write_all(dst_fd, view[:n])
            if n == 0:
                raise InvalidCheckpointError(
                    f"{src} ended at byte {offset + done} while it was being copied: the file changed or is "
                    "truncated; re-download it"
                )
            done += n


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------


class _SlabPool:
    """At most ``depth`` reusable byte buffers of ``slab_bytes`` (reused, so their pages fault in only once)."""

    def __init__(self, slab_bytes: int, depth: int) -> None:
        self.slab_bytes = slab_bytes
        self._depth = depth
        self._made = 0
        self._free: queue.Queue[torch.Tensor] = queue.Queue()

    def take(self, cancel: threading.Event) -> torch.Tensor:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._depth:
            self._made += 1
            return torch.empty(self.slab_bytes, dtype=torch.uint8)
        while True:
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                if cancel.is_set():
                    raise _Cancelled from None

    def give(self, slab: torch.Tensor) -> None:
        self._free.put(slab)


def _edit_lane(
    jobs: Sequence[ShardJob], pool: _SlabPool, results: queue.Queue[object], cancel: threading.Event
) -> None:
    torch.set_num_threads(1)  # per thread: the caller's setting is left alone
    try:
        for job in jobs:
            spans = [s for s in job.spans if isinstance(s, EditSpan)]
            if not spans:
                continue
            fd = os.open(job.src, os.O_RDONLY)
            try:
                for span in spans:
                    if cancel.is_set():
                        return
                    slab = pool.take(cancel)
                    raw = slab[: span.length]
                    read_into(fd, memoryview(raw.numpy()), span.offset, job.src)
                    tensor = raw.view(span.dtype).view(span.shape)
                    if span.rows:
                        stats = project_rows_(tensor.view(-1, span.shape[-1]), span.u, span.floor)
                    else:
                        stats = project_out_(tensor, span.u, span.axis, floor=span.floor)
                    results.put((span, slab, stats))
            finally:
                os.close(fd)
    except _Cancelled:
        return
    except BaseException as e:  # handed to the write lane, which re-raises it
        results.put(e)


def _next_result(results: queue.Queue[object], span: EditSpan) -> tuple[torch.Tensor, BlockStats]:
    item = results.get()
    if isinstance(item, BaseException):
        raise item
    got, slab, stats = item  # type: ignore[misc]
    if got is not span:  # pragma: no cover - both lanes walk the same list in the same order
        raise RuntimeError(f"edit pipeline out of order: expected {span.name}, got {got.name}")
    return slab, stats


def _samples_for(length: int) -> list[int]:
    """Offsets within a span of ``length`` bytes where a sample is kept: start, middle and end."""
    if length <= _SAMPLE_BYTES:
        return [0] if length else []
    return sorted({0, (length // 2) & ~7, length - _SAMPLE_BYTES})


def write_shards(
    jobs: Sequence[ShardJob],
    *,
    slab_bytes: int,
    depth: int = 4,
    advance: Callable[[int], object] = lambda n: None,
    on_shard_written: Callable[[Path], object] = lambda p: None,
) -> tuple[dict[str, BlockStats], list[Sample]]:
    """Write every job's shard through the two-lane pipeline.

    Args:
        jobs: the shards to write, in order; each ``dest`` must not exist yet.
        slab_bytes: size of each edit buffer; at least the longest :class:`EditSpan`.
        depth: how many edit buffers may exist at once (how far the edit lane runs ahead).
        advance: called with each span's byte count once it is written (progress).
        on_shard_written: called with each finished shard's path (e.g. to flush it in the background).

    Returns:
        The edit statistics of each writer tensor, and the samples to check with :func:`check_samples`.

    Raises:
        OSError: a read or write failed; ``ENOSPC``/``EFBIG``/``EDQUOT`` when the disk is full.
        WriteFailedError: a shard came out with another size than its header says.
        InvalidCheckpointError: an input file ended early.
    """
    longest = max((s.length for j in jobs for s in j.spans if isinstance(s, EditSpan)), default=0)
    if longest > slab_bytes:
        raise ValueError(f"slab_bytes={slab_bytes} is smaller than the longest edit span ({longest} bytes)")
    pool = _SlabPool(slab_bytes, max(1, depth))
    results: queue.Queue[object] = queue.Queue()
    cancel = threading.Event()
    worker = threading.Thread(
        target=_edit_lane, args=(jobs, pool, results, cancel), name="weightedit-edit", daemon=True
    )
    worker.start()
    stats: dict[str, BlockStats] = {}
    samples: list[Sample] = []
    copier = _Copier()
    try:
        for job in jobs:
            src_fd = os.open(job.src, os.O_RDONLY)
            try:
                dst_fd = os.open(job.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    pos = write_all(dst_fd, job.header)
                    for span in job.spans:
                        if isinstance(span, CopySpan):
                            copier.copy(src_fd, dst_fd, span.offset, span.length, job.src)
                            for k in _samples_for(span.length):
                                n = min(_SAMPLE_BYTES, span.length - k)
                                samples.append(Sample(job.dest, pos + k, n, src=job.src, src_offset=span.offset + k))
                        else:
                            slab, block_stats = _next_result(results, span)
                            view = memoryview(slab.numpy())[: span.length]
                            for k in _samples_for(span.length):
                                n = min(_SAMPLE_BYTES, span.length - k)
                                samples.append(Sample(job.dest, pos + k, n, expected=bytes(view[k : k + n])))
                            write_all(dst_fd, view)
                            del view
                            pool.give(slab)
                            stats.setdefault(span.name, BlockStats()).merge(block_stats)
                        pos += span.length
                        advance(span.length)
                    size = os.fstat(dst_fd).st_size
                finally:
                    os.close(dst_fd)
            finally:
                os.close(src_fd)
            if size != job.size:
                raise WriteFailedError(
                    f"writing {job.dest.name} produced {size} bytes instead of {job.size}: the output filesystem "
                    "lost data; choose another --out; nothing was written"
                )
            on_shard_written(job.dest)
    finally:
        cancel.set()
        worker.join()
    return stats, samples


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
            want = s.expected if s.expected is not None else os.pread(fds[s.src], s.length, s.src_offset)  # type: ignore[index]
            if got != want:
                raise InvalidCheckpointError(
                    f"verification failed: {s.dest.name} holds other bytes at offset {s.offset} than were "
                    f"{'computed' if s.expected is not None else 'copied'}; check the disk and run the edit again"
                )
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(samples)


# ----------------------------------------------------------------------------------------------------------
# Hashing the input for provenance
# ----------------------------------------------------------------------------------------------------------


def _hash_file(path: Path, stop: threading.Event) -> str | None:
    """SHA-256 of ``path`` (``None`` if stopped first); hashlib releases the GIL on large updates."""
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop.is_set():
                return None
            h.update(view[:n])
    return h.hexdigest()


class InputHasher:
    """SHA-256 of the input shards on a background thread, for provenance.

    A digest is not computed again when it is already known: files inside a Hub cache are named by it, and
    digests computed earlier are remembered by (path, size, mtime) in weightedit's cache
    (:func:`weightedit.sources.known_sha256`). A file that cannot be read is an error of the edit.
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
                    digest = _hash_file(path, self._stop)
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
                f"cannot read {path} to record its SHA-256: {e.strerror or e}; check the file and its permissions"
            )
        for path, digest in self._computed:
            with contextlib.suppress(OSError):  # a read-only cache only costs hashing again next time
                self._remember(path, digest)
        return {p.name: self._hashes[p.name] for p in self._paths}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
