"""SHA-256 of files, and the digests weightedit has computed before.

Digests are remembered in weightedit's cache by (path, size, modification time), so an unchanged large file
(a checkpoint shard, a GGUF file) is hashed once per machine.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import overload

from .atomic import write_text_atomic
from .cache import cache_dir

__all__ = ["sha256_file", "known_sha256", "cached_sha256", "remember_sha256"]

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
