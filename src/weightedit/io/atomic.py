"""Outputs that appear complete or not at all: the one place where weightedit writes files and folders.

Every output (a checkpoint folder, a report folder, a direction file, a cache entry) is built under a
hidden temporary sibling named ``.<name>.weightedit-tmp-<pid>-<random>``, flushed to disk (every file and
the folders holding them), and renamed into place. Replacing an existing folder (``overwrite``) is one
atomic exchange of the two folders where the kernel supports it (``renameat2(RENAME_EXCHANGE)``), else two
renames that are undone if the second one fails, so the previous output is back at its path on any failure.

Interrupts: :func:`install_signal_handlers` turns SIGINT, SIGTERM and SIGHUP into :class:`Interrupted`
(a ``KeyboardInterrupt``). While a rename or a cleanup runs, signals are held back and delivered
afterwards, so a second Ctrl-C cannot leave half-removed debris. Temporary paths that could not be removed
are listed by :func:`leftover_temporaries`; the next run over the same parent folder removes those whose
process is gone (and restores a previous output that a killed swap left aside).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from .._progress import console
from ..errors import OutputExistsError, UnsafeOutputError, WriteFailedError

__all__ = [
    "atomic_output_dir",
    "atomic_file",
    "write_text_atomic",
    "check_output_path",
    "check_output_file",
    "TMP_MARKER",
    "OLD_MARKER",
    "disk_full_error",
    "ensure_free_space",
    "Interrupted",
    "install_signal_handlers",
    "deferred_signals",
    "leftover_temporaries",
    "committed_outputs",
    "clean_stale_temporaries",
    "scratch_dir",
    "fsync_path",
]

TMP_MARKER = ".weightedit-tmp-"
OLD_MARKER = ".weightedit-old-"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NAME_MAX_DEFAULT = 255
_PATH_MAX_DEFAULT = 4096
# Room a temporary name needs beyond the output's own name: ".", the marker, "<pid>-<8 hex>".
_TMP_OVERHEAD = 1 + len(TMP_MARKER) + 8 + 1 + 8
_INPUT_FILES_LIMIT = 100_000  # files resolved per input folder (a model folder holds a few dozen)

# ----------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; ``signum`` says which (the exit code is ``128 + signum``)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_HANDLED = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
_defer_depth = 0
_pending: list[int] = []
_live: set[Path] = set()  # temporary paths created and not yet removed
_committed: list[Path] = []  # outputs renamed into place by this process
_named: set[Path] = set()  # other runs' temporaries already named to the user


def _handler(signum: int, frame: FrameType | None) -> None:
    if _defer_depth and threading.current_thread() is threading.main_thread():
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def install_signal_handlers() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _HANDLED}
    for s in _HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_signals(*, deliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while the block runs, then deliver the first one.

    A signal held back is dropped instead of delivered when the block raises, or when ``deliver`` is false
    (a cleanup that runs because of an error already on its way out). Only effective with
    :func:`install_signal_handlers` active; otherwise Python's default SIGINT handler applies as usual.
    """
    global _defer_depth
    _defer_depth += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _pending:
            signum = _pending[0]
            _pending.clear()
            if deliver and not failed:
                raise Interrupted(signum)


def leftover_temporaries() -> list[Path]:
    """Temporary paths of this process that still exist (empty after every clean exit or cleanup)."""
    return sorted(p for p in _live if os.path.lexists(p))


def committed_outputs() -> list[Path]:
    """Outputs this process has renamed into place and that are still there (so an interrupt after them did not
    lose them); one written inside a :func:`scratch_dir` is gone with it, and is not listed."""
    return [p for p in _committed if os.path.lexists(p)]


def reset_state() -> None:
    """Forget the temporary and committed paths recorded so far (one CLI command starts afresh)."""
    _live.intersection_update({p for p in _live if os.path.lexists(p)})
    _committed.clear()
    _pending.clear()


def _remove(path: Path, *, deliver: bool = True) -> None:
    """Remove a temporary file or folder, holding signals back so that the removal finishes."""
    with deferred_signals(deliver=deliver):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError, OSError):
                path.unlink()
    if not os.path.lexists(path):
        _live.discard(path)


# ----------------------------------------------------------------------------------------------------------
# Renames
# ----------------------------------------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2: Any = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
except OSError:  # pragma: no cover - no C library to load
    _renameat2 = None
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _rename2(src: Path, dst: Path, flags: int) -> None:
    """``renameat2(src, dst, flags)``; raises ``OSError(ENOSYS)`` where it does not exist."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists (even as an empty folder)."""
    try:
        _rename2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Put the folder ``tmp`` at ``out``, whose previous content ends up at the returned path (to remove).

    All or nothing: if this raises, ``out`` holds what it held before.
    """
    try:
        _rename2(tmp, out, _RENAME_EXCHANGE)
        return tmp  # tmp now holds the previous output
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    old = out.parent / _temp_name(out.name, OLD_MARKER)
    _live.add(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # the previous output goes back where it was
        _live.discard(old)
        raise
    return old


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush a file (or with ``directory``, a folder's entries) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some file systems do not let a folder be opened; nothing more can be done
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (files already flushed cost one cheap call each)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(dirpath), directory=True)


# ----------------------------------------------------------------------------------------------------------
# Names, parents and stale temporaries
# ----------------------------------------------------------------------------------------------------------


def _limits(folder: Path) -> tuple[int, int]:
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
        path_max = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return _NAME_MAX_DEFAULT, _PATH_MAX_DEFAULT
    return int(name_max or _NAME_MAX_DEFAULT), int(path_max or _PATH_MAX_DEFAULT)


def _temp_name(name: str, marker: str = TMP_MARKER) -> str:
    """``.<name>.weightedit-tmp-<pid>-<hex>``, with ``name`` shortened so the whole fits in NAME_MAX."""
    suffix = f"{marker}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    prefix = name
    while len(os.fsencode(f".{prefix}{suffix}")) > _NAME_MAX_DEFAULT and prefix:
        prefix = prefix[:-1]
    return f".{prefix}{suffix}"


_STALE = re.compile(r"^\.(?P<name>.*?)(?P<marker>\.weightedit-(?:tmp|old)-)(?P<pid>\d+-)?[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_QUIET_BEFORE_STALE_S = 120.0  # a temporary nobody wrote to for this long is not being written


def _recently_modified(path: Path) -> bool:
    """Whether ``path`` or anything directly inside it changed in the last two minutes."""
    import time

    limit = time.time() - _QUIET_BEFORE_STALE_S
    try:
        if path.lstat().st_mtime > limit:
            return True
        if path.is_dir() and not path.is_symlink():
            return any(child.lstat().st_mtime > limit for child in path.iterdir())
    except OSError:
        return False
    return False


def clean_stale_temporaries(parent: Path, name: str) -> tuple[list[Path], list[Path]]:
    """Remove the temporaries an interrupted weightedit run left for output ``name`` in ``parent``.

    A temporary whose process is gone (and that nobody wrote to for two minutes, in case its owner runs
    in another PID namespace or on another host) is removed; a previous output that a killed swap had set aside
    (``.<name>.weightedit-old-*``) is moved back to ``<name>`` when ``<name>`` is missing. Temporaries whose
    owner cannot be told (named by an older weightedit, or still running) are left alone and returned so
    that they can be named to the user.

    Returns:
        ``(removed_or_restored, left_alone)``.
    """
    done: list[Path] = []
    kept: list[Path] = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return done, kept
    target = parent / name
    for entry in sorted(entries):
        m = _STALE.match(entry.name)
        if not m or not (name.startswith(m["name"]) and (m["name"] == name or len(m["name"]) >= 16)):
            continue
        if m["pid"] is None:
            kept.append(entry)  # an older weightedit's name: its owner cannot be told
            continue
        if _pid_alive(int(m["pid"][:-1])):
            if int(m["pid"][:-1]) != os.getpid():
                kept.append(entry)
            continue
        if _recently_modified(entry):
            kept.append(entry)  # a process of another PID namespace or host may still be writing it
            continue
        if m["marker"] == OLD_MARKER and not os.path.lexists(target) and m["name"] == name:
            with deferred_signals():
                os.rename(entry, target)
            done.append(entry)
            continue
        _remove(entry)
        if not os.path.lexists(entry):
            done.append(entry)
    return done, kept


def _report_stale(parent: Path, name: str) -> None:
    done, kept = clean_stale_temporaries(parent, name)
    for p in done:
        what = "restored the previous output from" if OLD_MARKER in p.name else "removed"
        console.print(
            f"[dim]note: {what} {p}, left by an interrupted weightedit run[/]", highlight=False, soft_wrap=True
        )
    for p in kept:
        if p in _named:
            continue
        _named.add(p)
        console.print(
            f"[yellow]note: {p} looks like a temporary folder of another weightedit run; delete it if no "
            "weightedit command is running[/]",
            highlight=False,
            soft_wrap=True,
        )


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; return the folders that were created (outermost first)."""
    missing: list[Path] = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if os.path.lexists(p) and not p.is_dir():
        raise UnsafeOutputError(
            f"cannot create {folder}: {p} is a file, not a folder; choose another <<out>>", path=folder, option="out"
        )
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            _remove_created(created)
            raise _write_error(e, folder, f"cannot create {d}") from None
        created.append(d)
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if still empty


# ----------------------------------------------------------------------------------------------------------
# Checks before any work starts
# ----------------------------------------------------------------------------------------------------------


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _real_files(src: Path) -> Iterable[Path]:
    """Every file of an input, with symlinks resolved (shards linked into a cache's blob store, git-annex, DVC)."""
    if not src.is_dir():
        yield src.resolve()
        return
    for n, (dirpath, dirnames, filenames) in enumerate(os.walk(src)):
        if n > _INPUT_FILES_LIMIT:
            return
        for name in (*filenames, *dirnames):
            p = Path(dirpath) / name
            if p.is_symlink() or name in filenames:
                with contextlib.suppress(OSError, RuntimeError):
                    yield p.resolve()


def _check_length(out: Path) -> None:
    ancestor = next((p for p in (out, *out.parents) if os.path.isdir(p)), Path("/"))
    name_max, path_max = _limits(ancestor)
    for part in out.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise UnsafeOutputError(
                f"<<out>> name {part[:40]}… is {size} bytes long, over the file system's limit of {name_max}: "
                "choose a shorter name",
                path=out,
                option="out",
            )
    size = len(os.fsencode(str(out))) + _TMP_OVERHEAD
    if size >= path_max:
        raise UnsafeOutputError(
            f"<<out>> path is {size - _TMP_OVERHEAD} bytes long, too close to the file system's limit of {path_max} "
            "(PATH_MAX): choose a shorter path",
            path=out,
            option="out",
        )


def _check_parents(out: Path) -> None:
    for p in out.parents:
        if os.path.lexists(p):
            if not os.path.isdir(p):
                raise UnsafeOutputError(
                    f"<<out>> {out} lies below {p}, which is a file, not a folder: choose another <<out>>",
                    path=out,
                    option="out",
                )
            return


def _check_overlap(out: Path, inputs: tuple[Path, ...]) -> None:
    for given in inputs:
        src = Path(given).expanduser()
        real = src.resolve()
        if out == real or _is_within(out, real) or _is_within(real, out):
            raise UnsafeOutputError(
                f"<<out>> {out} overlaps the input model {real}: choose an output folder outside the input "
                "(weightedit never writes into its input)",
                path=out,
                option="out",
            )
        for f in _real_files(src):
            if f == out or _is_within(f, out):
                raise UnsafeOutputError(
                    f"<<out>> {out} holds {f}, a file of the input model {src} (linked from it): choose an "
                    "output outside the input's files (weightedit never writes over its input)",
                    path=out,
                    option="out",
                )


def _check_writable(out: Path) -> None:
    """Fail now, not after hours of work, when the folder that will hold ``out`` cannot take a new entry."""
    ancestor = next((p for p in out.parents if os.path.isdir(p)), None)
    if ancestor is None:
        return
    probe = ancestor / _temp_name("probe")
    _live.add(probe)
    try:
        probe.mkdir()
    except OSError as e:
        _live.discard(probe)
        raise _write_error(e, out) from None
    _remove(probe, deliver=False)


def _resolved(out: Path | str) -> Path:
    if str(out).strip() == "":
        raise UnsafeOutputError("<<out>> is empty: pass the path to write to", option="out", value=out)
    absolute = Path(os.path.abspath(Path(out).expanduser()))
    _check_length(absolute)  # before resolving: resolving a name over the limit fails in the kernel
    return absolute.resolve()


def check_output_path(out: Path | str, *, inputs: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Validate an output *folder* before any work starts (nothing is created); return it resolved.

    Raises:
        UnsafeOutputError: ``out`` is an input, lies inside one, contains one or one of its (linked) files,
            lies below a file, or its name or path is longer than the file system allows.
        OutputExistsError: ``out`` exists and ``overwrite`` is false, or exists and is not a folder.
    """
    out = _resolved(out)
    _check_length(out)
    _check_parents(out)
    _check_overlap(out, tuple(inputs))
    _check_writable(out)
    # A previous output that a killed run had set aside goes back first, so that the checks below see it.
    _report_stale(out.parent, out.name)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExistsError(
            f"<<out>> {out} exists and is not a folder: remove it or choose another path", path=out, option="out"
        )
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"<<out>> {out} already exists: pass <<overwrite>> to replace it, or choose another folder",
            path=out,
            option="out",
        )
    return out


def check_output_file(
    out: Path | str, *, inputs: tuple[Path, ...] = (), overwrite: bool = False, option: str = "<<out>>"
) -> Path:
    """Validate an output *file* (a direction file, a report) before any work starts; return it resolved.

    Raises:
        UnsafeOutputError / OutputExistsError: as :func:`check_output_path`, and when ``out`` is a folder.
    """
    out = _resolved(out)
    _check_length(out)
    _check_parents(out)
    _check_overlap(out, tuple(inputs))
    _check_writable(out)
    if out.is_dir():
        raise OutputExistsError(
            f"{option} {out} is a folder: pass a file name (e.g. {out / 'refusal.safetensors'})",
            path=out,
            option=_marked(option),
        )
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(
            f"{option} {out} already exists: pass <<overwrite>> to replace it, or choose another path",
            path=out,
            option=_marked(option),
        )
    return out


def _marked(label: str) -> str | None:
    """The option name in a ``<<option>>`` label, or ``None`` for a plain label (``scores file``)."""
    return label[2:-2] if label.startswith("<<") and label.endswith(">>") else None


def _write_error(err: OSError, out: Path, what: str | None = None) -> WriteFailedError:
    if err.errno in _DISK_FULL:
        return disk_full_error(err, out)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and err.filename:
        folder = Path(err.filename).parent
        return WriteFailedError(
            f"output folder {folder} is not writable ({err.strerror}): choose another <<out>>; nothing was written",
            path=folder,
            option="out",
        )
    where = f" ({err.filename})" if err.filename else ""
    return WriteFailedError(
        f"{what or f'writing {out} failed'}: {err.strerror or err}{where}; check the path and its permissions, "
        "or choose another <<out>>; nothing was written",
        path=out,
        option="out",
    )


def disk_full_error(err: OSError, out: Path) -> WriteFailedError:
    """A one-line error for a failed write, with the fix."""
    if err.errno in _DISK_FULL:
        return WriteFailedError(
            f"not enough disk space while writing {out} ({os.strerror(err.errno)}): free space or choose "
            "another <<out>>; nothing was written",
            path=out,
            option="out",
        )
    return WriteFailedError(f"writing {out} failed: {err.strerror or err}; nothing was written", path=out)


def ensure_free_space(parent: Path, needed: int, out: Path) -> None:
    """Fail early when the target filesystem clearly cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise WriteFailedError(
            f"not enough disk space for {out}: {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free in "
            f"{parent}; free space or choose another <<out>>",
            path=out,
            option="out",
        )


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------


def _translate(e: OSError, out: Path) -> BaseException:
    if isinstance(e, WriteFailedError):
        return e
    if e.errno in _DISK_FULL:
        return disk_full_error(e, out)
    if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.ENAMETOOLONG):
        return _write_error(e, out)
    return e


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False, record: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success flush it and rename it to ``out``.

    On any exception (including ``KeyboardInterrupt`` and :class:`Interrupted`) the temporary folder is
    removed, folders created for ``out``'s parent are removed again, and ``out`` is left as it was. With
    ``overwrite`` an existing ``out`` is replaced only after the new one is complete, in one step.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    parent = out.parent
    _check_length(out)
    created = _make_parents(parent)
    if not os.access(parent, os.W_OK):
        _remove_created(created)
        raise WriteFailedError(
            f"output folder {parent} is not writable: choose another <<out>>; nothing was written",
            path=parent,
            option="out",
        )
    _report_stale(parent, out.name)
    tmp = parent / _temp_name(out.name)
    _live.add(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        _live.discard(tmp)
        _remove_created(created)
        raise _write_error(e, out) from None
    committed = False
    previous: Path | None = None
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except OSError as e:
            raise _translate(e, out) from None
        with deferred_signals():
            try:
                if overwrite and os.path.lexists(out):
                    if not out.is_dir() or out.is_symlink():
                        raise OutputExistsError(
                            f"<<out>> {out} exists and is not a folder: remove it or choose another path",
                            path=out,
                            option="out",
                        )
                    previous = _swap_in(tmp, out)
                else:
                    _rename_noreplace(tmp, out)
            except FileExistsError:
                raise OutputExistsError(
                    f"<<out>> {out} appeared while writing: pass <<overwrite>> to replace it, or choose another folder",
                    path=out,
                    option="out",
                ) from None
            except OSError as e:
                raise _write_error(e, out) from None
            committed = True
            _live.discard(tmp)
            if record:
                _committed.append(out)
            if previous is not None:
                _live.add(previous)
            fsync_path(parent, directory=True)
        if previous is not None:
            _remove(previous)
    except BaseException:
        if committed:
            if previous is not None:
                _remove(previous, deliver=False)
        else:
            _remove(tmp, deliver=False)
            _remove_created(created)
        raise


@contextlib.contextmanager
def atomic_file(out: Path | str, *, record: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``out``; on success flush it and rename it over ``out``.

    On any exception the temporary file and the folders created for it are removed and ``out`` is as it was.
    ``record=False`` keeps a cache entry out of the outputs an interrupt message lists as complete.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    _check_length(out)
    if out.is_dir():
        raise OutputExistsError(f"{out} is a folder: pass a file name", path=out)
    created = _make_parents(out.parent)
    _report_stale(out.parent, out.name)
    tmp = out.parent / _temp_name(out.name)
    _live.add(tmp)
    committed = False
    try:
        try:
            yield tmp
            fsync_path(tmp)
            with deferred_signals():
                os.replace(tmp, out)
                committed = True
                _live.discard(tmp)
                if record:
                    _committed.append(out)
                fsync_path(out.parent, directory=True)
        except OSError as e:
            raise _translate(e, out) from None
    except BaseException:
        if not committed:
            _remove(tmp, deliver=False)
            _remove_created(created)
        raise


@contextlib.contextmanager
def scratch_dir(parent: Path | str, name: str) -> Iterator[Path]:
    """A temporary working folder ``parent/.<name>.weightedit-tmp-<pid>-<hex>``, removed when the block ends.

    Named like every other temporary, so that the next run finds it (and removes it) after a ``kill -9``.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(parent, name)
    path = parent / _temp_name(name)
    _live.add(path)
    path.mkdir()
    try:
        yield path
    finally:
        _remove(path, deliver=False)


def write_text_atomic(out: Path | str, text: str, *, record: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``out`` through :func:`atomic_file`."""
    with atomic_file(out, record=record) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(os.path.abspath(Path(out).expanduser()))
