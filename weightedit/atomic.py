"""Output folders that appear complete or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError, UnsafeOutputError, WriteFailedError

__all__ = ["atomic_output_dir", "check_output_path", "TMP_MARKER", "disk_full_error", "ensure_free_space"]

TMP_MARKER = ".weightedit-tmp-"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(out: Path, *, inputs: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Validate ``out`` before any work starts; return it resolved.

    Raises:
        UnsafeOutputError: ``out`` is an input, lies inside one, or contains one.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or _is_within(out, src) or (src.is_dir() and _is_within(src, out)) or _is_within(src, out):
            raise UnsafeOutputError(
                f"--out {out} overlaps the input model {src}: choose an output folder outside the input "
                "(weightedit never writes into its input)"
            )
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists: pass --overwrite to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder: remove it or choose another path")
    return out


def disk_full_error(err: OSError, out: Path) -> WriteFailedError:
    """A one-line error for a failed write, with the fix."""
    if err.errno in _DISK_FULL:
        return WriteFailedError(
            f"not enough disk space while writing {out} ({os.strerror(err.errno)}): free space or choose "
            "another --out; nothing was written"
        )
    return WriteFailedError(f"writing {out} failed: {err.strerror or err}; nothing was written")


def ensure_free_space(parent: Path, needed: int, out: Path) -> None:
    """Fail early when the target filesystem clearly cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise WriteFailedError(
            f"not enough disk space for {out}: {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free in "
            f"{parent}; free space or choose another --out"
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success rename it to ``out``.

    On any exception (including ``KeyboardInterrupt``) the temporary folder is removed and ``out`` is
    left as it was. With ``overwrite`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteFailedError(f"cannot create {parent}: {e.strerror or e}; choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise WriteFailedError(f"{parent} is not writable: choose a writable --out")
    tmp = parent / f".{out.name}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            yield tmp
        except OSError as e:
            if isinstance(e, WriteFailedError):
                raise
            if e.errno in _DISK_FULL:
                raise disk_full_error(e, out) from None
            raise
        old = None
        if out.exists():
            if not overwrite:
                raise OutputExistsError(
                    f"--out {out} appeared while writing: pass --overwrite or choose another folder"
                )
            old = parent / f".{out.name}.weightedit-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
