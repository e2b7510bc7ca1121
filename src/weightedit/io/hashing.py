"""SHA-256 of files, and the digests weightedit has computed before.

Digests are remembered in weightedit's cache by (path, size, modification time), so an unchanged large file
(a checkpoint shard, a GGUF file) is hashed once per machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import overload

from ..errors import InvalidCheckpointError
from .atomic import write_text_atomic
from .cache import cache_dir

__all__ = ["sha256_file", "known_sha256", "cached_sha256", "remember_sha256", "InputHasher"]

_CHUNK = 8 << 20  # bytes read per call; hashlib releases the GIL on updates this large


@overload
def sha256_file(path: Path) -> str: ...
@overload
def sha256_file(path: Path, *, stop: threading.Event) -> str | None: ...
def sha256_file(path: Path, *, stop: threading.Event | None = None) -> str | None:
    """SHA-256 of ``path``; with ``stop``, ``None`` when the event is set before the file is read to its end."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                return None
            h.update(view[:n])
    return h.hexdigest()


def _index_path() -> Path:
    return cache_dir() / "sha256-index.json"


def _read_index() -> dict[str, str]:
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def known_sha256(path: Path) -> str | None:
    """The SHA-256 of ``path`` if it was computed before for the same (path, size, mtime), else ``None``."""
    digest = _read_index().get(_stat_key(path))
    return str(digest) if digest else None


def cached_sha256(path: Path) -> str:
    """SHA-256 of ``path``, remembered by (path, size, mtime) so unchanged large files are hashed once."""
    known = known_sha256(path)
    if known is not None:
        return known
    digest = sha256_file(path)
    remember_sha256(path, digest)
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    """Record ``digest`` as the SHA-256 of ``path`` as it is now (same path, size and mtime)."""
    index = _read_index()
    index[_stat_key(path)] = digest
    write_text_atomic(_index_path(), json.dumps(index, indent=0), record=False)


class InputHasher:
    """SHA-256 of the input shards on a background thread, for provenance.

    A digest is not computed again when it is already known: files inside a Hub cache are named by it, and
    digests computed earlier are remembered by (path, size, mtime) in weightedit's cache
    (:func:`known_sha256`). A file that cannot be read is an error of the edit.
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
