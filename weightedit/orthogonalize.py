"""Streaming orthogonalization of a safetensors checkpoint.

The rewriter reads one tensor (or one block of rows) at a time: writer tensors are edited
(:mod:`weightedit.edit`), every other tensor is copied as raw bytes (``copy_file_range``), and each
output shard keeps the input's name, tensor order and byte offsets. Peak memory is one block of one
tensor, whatever the model size. The output is built in a temporary sibling folder and renamed into
place only after it is verified; the input is never opened for writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import __version__
from ._progress import progress_bar
from .arch import ArchSpec, WriterMatch, spec_for_config
from .atomic import atomic_output_dir, check_output_path, ensure_free_space
from .checkpoint import (
    WEIGHTS_INDEX_NAME,
    Checkpoint,
    ShardHeader,
    TensorInfo,
    encode_header,
    read_header,
    read_tensor_bytes,
)
from .direction import Direction, check_selection
from .edit import BlockStats, effective_direction, noise_floor, project_out_, project_rows_, unit_direction
from .errors import InvalidCheckpointError, InvalidDirectionError
from .sources import ModelSource, public_name, resolve_model

__all__ = [
    "EditReport",
    "TiedEmbeddings",
    "orthogonalize",
    "orthogonalize_checkpoint",
    "orthogonalize_model_",
    "plan_edit",
    "EditPlan",
]

TiedEmbeddings = Literal["untie", "edit-both"]

# Files of a model folder that are never copied to the output: weights in other formats (they would
# not be edited), the base model's card (the output gets its own), and the input's provenance.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".incomplete")
_SKIP_NAMES = {WEIGHTS_INDEX_NAME, "README.md", "weightedit.json", "weightedit-gguf.json", ".gitattributes"}
_BLOCK_BYTES = 64 << 20  # rows read per block when editing large tensors


@dataclass(frozen=True)
class EditPlan:
    """What an edit will do, decided from headers alone (used by ``inspect`` and the rewriter)."""

    checkpoint: Checkpoint
    spec: ArchSpec
    writers: dict[str, WriterMatch]
    tied: bool  # the LM head reads the input embedding matrix
    embedding: str | None  # name of the input embedding tensor

    @property
    def writer_bytes(self) -> int:
        return sum(self.checkpoint.find(n)[1].nbytes for n in self.writers)

    def groups(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.writers.values():
            counts[m.rule.group] = counts.get(m.rule.group, 0) + 1
        return dict(sorted(counts.items()))

    def largest_tensor(self) -> TensorInfo:
        return max((info for _, info in self.checkpoint.tensors()), key=lambda t: t.numel)


@dataclass(frozen=True)
class EditReport:
    """Result of :func:`orthogonalize_checkpoint`."""

    out: Path
    model_type: str
    d_model: int
    groups: dict[str, int]
    tensors_edited: int
    tensors_already_orthogonal: int
    tensors_copied: int
    bytes_written: int
    max_relative_residual: float
    tied_embeddings: str | None
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)


def plan_edit(checkpoint: Checkpoint) -> EditPlan:
    """Find the writer tensors of ``checkpoint`` and check they can be edited.

    Raises:
        UnsupportedArchitectureError: unknown ``model_type``.
        QuantizedCheckpointError: quantized weights.
        InvalidCheckpointError: a writer with an unexpected shape or dtype, or no writers at all.
    """
    spec = spec_for_config(checkpoint.config)
    checkpoint.check_not_quantized()
    d_model = checkpoint.d_model
    writers: dict[str, WriterMatch] = {}
    embedding = None
    names = [info.name for _, info in checkpoint.tensors()]
    for name in names:
        if spec.is_embedding(name):
            embedding = name
        m = spec.match(name)
        if m is None:
            continue
        _, info = checkpoint.find(name)
        if info.torch_dtype is None:
            raise InvalidCheckpointError(
                f"writer {name!r} has dtype {info.dtype}: weightedit edits float tensors; use an unquantized checkpoint"
            )
        if not info.shape or info.shape[m.rule.axis] != d_model:
            raise InvalidCheckpointError(
                f"writer {name!r} has shape {list(info.shape)}, expected size {d_model} on axis {m.rule.axis}: "
                f"the {spec.model_type} registry entry does not fit this checkpoint"
            )
        if m.norm_name is not None and m.norm_name not in checkpoint.weight_map:
            raise InvalidCheckpointError(
                f"post-norm writer {name!r} needs {m.norm_name!r}, which is not in the checkpoint"
            )
        writers[name] = m
    if not writers:
        raise InvalidCheckpointError(
            f"no residual-stream writers found among {len(names)} tensors of this {spec.model_type} checkpoint: "
            "its tensor names do not follow the transformers layout"
        )
    tied = embedding is not None and spec.lm_head not in checkpoint.weight_map
    return EditPlan(checkpoint=checkpoint, spec=spec, writers=writers, tied=tied, embedding=embedding)


def orthogonalize(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    direction: Direction | torch.Tensor,
    *,
    tied_embeddings: TiedEmbeddings = "untie",
    overwrite: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    allow_model_mismatch: bool = False,
    allow_failing_filters: bool = False,
    progress: bool = True,
    extra_provenance: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> EditReport:
    """Resolve ``model`` (folder, ``.gguf``, Hub id, ``recipe:NAME``) and write an edited copy to ``out``.

    The output path is checked before anything is downloaded or converted.
    """
    out_path = Path(out).expanduser()
    local = Path(str(model)).expanduser()
    early_inputs = (local,) if str(model) and local.exists() else ()
    check_output_path(out_path, inputs=early_inputs, overwrite=overwrite)
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=progress)
    return orthogonalize_checkpoint(
        source,
        out_path,
        direction,
        tied_embeddings=tied_embeddings,
        overwrite=overwrite,
        allow_model_mismatch=allow_model_mismatch,
        allow_failing_filters=allow_failing_filters,
        progress=progress,
        extra_provenance=extra_provenance,
        extra_files=extra_files,
    )


def _direction_name(direction: Direction) -> str:
    file = direction.meta.get("file") if isinstance(direction.meta, dict) else None
    return f"direction {file}" if file else "the direction"


def orthogonalize_checkpoint(
    source: ModelSource | str | os.PathLike[str],
    out: str | os.PathLike[str],
    direction: Direction | torch.Tensor,
    *,
    tied_embeddings: TiedEmbeddings = "untie",
    overwrite: bool = False,
    allow_model_mismatch: bool = False,
    allow_failing_filters: bool = False,
    progress: bool = True,
    extra_provenance: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    block_bytes: int = _BLOCK_BYTES,
) -> EditReport:
    """Write a copy of a local checkpoint with ``direction`` projected out of every residual writer.

    Args:
        source: a resolved :class:`ModelSource` or a local ``save_pretrained`` folder.
        out: output folder; must not exist (unless ``overwrite``) and must not overlap the input.
        direction: a :class:`Direction` (checked against the model) or a ``[d_model]`` tensor.
        tied_embeddings: for models whose LM head shares the embedding matrix: ``"untie"`` (default)
            keeps the original matrix as ``lm_head.weight`` so the edit is exact; ``"edit-both"`` edits the
            shared matrix and keeps the checkpoint tied (smaller, not exact).
        overwrite: replace an existing ``out`` once the new one is complete.
        allow_model_mismatch: accept a direction file whose model fingerprint differs.
        allow_failing_filters: accept a direction whose selection failed the KL filter (recorded in
            ``weightedit.json``); without it such a direction is refused before anything is written.
        progress: show a rich progress bar on stderr.
        extra_provenance: merged into ``weightedit.json``.
        extra_files: files copied into the output folder under the given names (e.g. the direction file).

    Returns:
        An :class:`EditReport`.
    """
    started = time.perf_counter()
    if not isinstance(source, ModelSource):
        folder = Path(source).expanduser().resolve()
        source = ModelSource(folder=folder, given=str(source), kind="local", inputs=(folder,))
    if tied_embeddings not in ("untie", "edit-both"):
        raise ValueError(f"tied_embeddings must be 'untie' or 'edit-both', got {tied_embeddings!r}")
    out = check_output_path(Path(out), inputs=(source.folder, *source.inputs), overwrite=overwrite)

    checkpoint = Checkpoint.open(source.folder)
    plan = plan_edit(checkpoint)
    d_model = checkpoint.d_model
    if isinstance(direction, Direction):
        direction.check_model(checkpoint.config, allow_mismatch=allow_model_mismatch)
        check_selection(direction, allow_failing_filters=allow_failing_filters, source=_direction_name(direction))
        r = unit_direction(direction.vector, d_model)
    else:
        r = unit_direction(direction, d_model)
        direction = Direction(vector=r)

    # Post-norm writers are projected against the normalized γ ⊙ r of the norm that follows them.
    norm_cache: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    for name, m in plan.writers.items():
        if m.norm_name is None:
            targets[name] = r
            continue
        if m.norm_name not in norm_cache:
            norm_cache[m.norm_name] = effective_direction(r, checkpoint.read_tensor(m.norm_name), plan.spec.norm_offset)
        targets[name] = norm_cache[m.norm_name]

    untie = plan.tied and tied_embeddings == "untie"
    extra_bytes = checkpoint.find(plan.embedding)[1].nbytes if untie and plan.embedding else 0
    ensure_free_space(_existing_ancestor(out), checkpoint.total_bytes + extra_bytes, out)

    hasher = _BackgroundHasher([s.path for s in checkpoint.shards])
    # Flushing a finished shard to disk overlaps with writing the next one.
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightedit-fsync")
    pending_syncs: list[Future[None]] = []
    stats_total: dict[str, BlockStats] = {}
    bytes_written = 0
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            total = checkpoint.total_bytes + extra_bytes
            with progress_bar(f"editing {source.given}", total, enabled=progress, unit="bytes") as bar:
                shard_meta = {
                    "weightedit_version": __version__,
                    "weightedit_direction_sha256": direction.sha256(),
                    "weightedit_source": source.public_name,
                }
                for shard in checkpoint.shards:
                    extras: list[tuple[str, ShardHeader, TensorInfo]] = []
                    if untie and plan.embedding in shard.tensors:
                        extras.append((plan.spec.lm_head, shard, shard.tensors[plan.embedding]))
                    stats = _write_shard(
                        shard,
                        tmp / shard.path.name,
                        targets=targets,
                        axes={n: m.rule.axis for n, m in plan.writers.items()},
                        extras=extras,
                        metadata={**shard.metadata, **shard_meta},
                        block_bytes=block_bytes,
                        advance=bar.advance,
                    )
                    stats_total.update(stats)
                    bytes_written += (tmp / shard.path.name).stat().st_size
                    pending_syncs.append(syncer.submit(_fsync_file, tmp / shard.path.name))
                for fut in pending_syncs:
                    fut.result()  # re-raises a failed flush (e.g. the disk filled up)
            _write_index(checkpoint, tmp, lm_head=plan.spec.lm_head if untie else None, embedding=plan.embedding)
            # A config that says "tied" beside a stored lm_head would make transformers read the edited embedding
            # as the head instead of the stored one; the stored head is what this edit keeps, so say untied.
            stale_tie = plan.embedding is not None and not plan.tied and _config_ties(checkpoint.config)
            _copy_side_files(checkpoint.folder, tmp, untie=untie or stale_tie)
            for name, path in (extra_files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / name)
            verification = _verify(checkpoint, tmp, plan, stats_total, untie=untie)
            input_hashes = hasher.result()
            provenance = {
                "weightedit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": {
                    **source.provenance(),
                    "license": source.details.get("license") or _input_card(checkpoint.folder).get("license"),
                    "language": source.details.get("language") or _input_card(checkpoint.folder).get("language"),
                },
                "input_shards": input_hashes,
                "model_type": plan.spec.model_type,
                "d_model": d_model,
                "direction": {
                    "sha256": direction.sha256(),
                    "layer": direction.layer,
                    "position": direction.position,
                    "languages": list(direction.languages),
                    "model": public_name(direction.model),
                    "config_hash": direction.config_hash,
                    **{
                        k: (Path(str(v)).name if k == "file" else v)
                        for k, v in direction.meta.items()
                        if k in ("file", "file_sha256", "n_harmful", "n_harmless", "selection")
                    },
                },
                "options": {
                    "tied_embeddings": tied_embeddings if plan.tied else None,
                    "allow_model_mismatch": bool(allow_model_mismatch),
                    "allow_failing_filters": allow_failing_filters,
                },
                "edited_groups": plan.groups(),
                "verification": verification,
                **(extra_provenance or {}),
            }
            parent = checkpoint.folder / "weightedit.json"
            if parent.exists():
                with contextlib.suppress(OSError, ValueError):
                    provenance["parent"] = json.loads(parent.read_text(encoding="utf-8"))
            (tmp / "weightedit.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
            _fsync_dir(tmp)
    finally:
        hasher.stop()
        syncer.shutdown(wait=True, cancel_futures=True)

    edited = sum(1 for s in stats_total.values() if s.changed)
    return EditReport(
        out=out,
        model_type=plan.spec.model_type,
        d_model=d_model,
        groups=plan.groups(),
        tensors_edited=edited,
        tensors_already_orthogonal=len(stats_total) - edited,
        tensors_copied=sum(len(s.tensors) for s in checkpoint.shards) - len(stats_total),
        bytes_written=bytes_written,
        max_relative_residual=verification["max_relative_residual"],
        tied_embeddings=(tied_embeddings if plan.tied else None),
        seconds=time.perf_counter() - started,
        provenance=provenance,
    )


# ----------------------------------------------------------------------------------------------------------
# Shard writing
# ----------------------------------------------------------------------------------------------------------


def _write_shard(
    shard: ShardHeader,
    dest: Path,
    *,
    targets: dict[str, torch.Tensor],
    axes: dict[str, int],
    extras: list[tuple[str, ShardHeader, TensorInfo]],
    metadata: dict[str, str],
    block_bytes: int,
    advance: Any,
) -> dict[str, BlockStats]:
    """Write one output shard: same tensors at the same offsets, writers edited, ``extras`` appended."""
    ordered = shard.ordered()
    end = ordered[-1].end if ordered else 0
    entries = [(t.name, t.dtype, t.shape, t.start, t.end) for t in ordered]
    for name, _, info in extras:
        entries.append((name, info.dtype, info.shape, end, end + info.nbytes))
        end += info.nbytes
    header = encode_header(entries, metadata)
    stats: dict[str, BlockStats] = {}
    src_fd = os.open(shard.path, os.O_RDONLY)
    try:
        with open(dest, "wb", buffering=0) as out:
            out.write(header)
            pending_start: int | None = None  # a run of untouched tensors, copied in one call
            pending_end = 0
            for info in ordered:
                if info.name not in targets:
                    if pending_start is None:
                        pending_start = info.start
                    pending_end = info.end
                    continue
                if pending_start is not None:
                    _copy_range(src_fd, out, shard.data_start + pending_start, pending_end - pending_start)
                    advance(pending_end - pending_start)
                    pending_start = None
                stats[info.name] = _write_edited(
                    shard, info, out, targets[info.name], axes[info.name], block_bytes, advance
                )
            if pending_start is not None:
                _copy_range(src_fd, out, shard.data_start + pending_start, pending_end - pending_start)
                advance(pending_end - pending_start)
            for _, src, info in extras:
                if src.path == shard.path:
                    _copy_range(src_fd, out, shard.data_start + info.start, info.nbytes)
                else:  # pragma: no cover - extras always come from the same shard today
                    fd = os.open(src.path, os.O_RDONLY)
                    try:
                        _copy_range(fd, out, src.data_start + info.start, info.nbytes)
                    finally:
                        os.close(fd)
                advance(info.nbytes)
    finally:
        os.close(src_fd)
    return stats


def _write_edited(
    shard: ShardHeader,
    info: TensorInfo,
    out: Any,
    u: torch.Tensor,
    axis: int,
    block_bytes: int,
    advance: Any,
) -> BlockStats:
    """Edit one writer tensor and append its bytes to ``out``."""
    d = info.shape[axis]
    floor = noise_floor(info.torch_dtype, d)
    axis = axis % len(info.shape)
    rows = info.shape[0]
    row_bytes = info.nbytes // rows if rows else 0
    stats = BlockStats()
    if axis == len(info.shape) - 1 and len(info.shape) > 1 and row_bytes:
        # Row-local (embeddings, Conv1D): stream blocks of rows.
        step = max(1, block_bytes // row_bytes)
        for r0 in range(0, rows, step):
            block = read_tensor_bytes(shard, info, r0, min(rows, r0 + step))
            stats.merge(project_rows_(block.reshape(-1, d), u, floor))
            _write_all(out, block)
            advance(block.numel() * block.element_size())
        return stats
    # Column-local (Linear [d, d_in], expert stacks) and biases: one tensor at a time.
    tensor = read_tensor_bytes(shard, info)
    stats = project_out_(tensor, u, axis, floor=floor)
    _write_all(out, tensor)
    advance(info.nbytes)
    return stats


def _write_all(out: Any, tensor: torch.Tensor) -> None:
    data = memoryview(tensor.contiguous().view(torch.uint8).numpy())
    while data:
        n = out.write(data)
        data = data[n:]


_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def _copy_range(src_fd: int, out: Any, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src_fd`` starting at ``offset`` to ``out`` (in the kernel when possible)."""
    global _COPY_FILE_RANGE
    dst_fd = out.fileno()
    done = 0
    while done < length and _COPY_FILE_RANGE:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                _COPY_FILE_RANGE = False
                break
            raise
        if n == 0:
            raise InvalidCheckpointError(f"input ended early at byte {offset + done}: the shard is truncated")
        done += n
    buf = bytearray(min(_BLOCK_BYTES, max(0, length - done)))
    while done < length:
        chunk = os.pread(src_fd, min(len(buf), length - done), offset + done)
        if not chunk:
            raise InvalidCheckpointError(f"input ended early at byte {offset + done}: the shard is truncated")
        out.write(chunk)
        done += len(chunk)


# ----------------------------------------------------------------------------------------------------------
# Index, side files, verification
# ----------------------------------------------------------------------------------------------------------


def _write_index(checkpoint: Checkpoint, tmp: Path, *, lm_head: str | None, embedding: str | None) -> None:
    if checkpoint.index is None:
        return
    index = json.loads(json.dumps(checkpoint.index))
    weight_map = dict(index["weight_map"])
    meta = dict(index.get("metadata") or {})
    if lm_head and embedding:
        weight_map[lm_head] = weight_map[embedding]
        if isinstance(meta.get("total_parameters"), int):
            meta["total_parameters"] += checkpoint.find(embedding)[1].numel
    index["weight_map"] = dict(sorted(weight_map.items()))
    headers = [read_header(tmp / name) for name in sorted(set(weight_map.values()))]
    meta["total_size"] = sum(h.file_size - h.data_start for h in headers)
    index["metadata"] = meta
    (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _config_ties(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` asks for tied embeddings (or leaves it to a class default that may be true)."""
    configs = [config, *([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])]
    return any(c.get("tie_word_embeddings", True) is not False for c in configs)


def _copy_side_files(src: Path, tmp: Path, *, untie: bool) -> None:
    """Copy configs, tokenizer files, chat templates and remote code; update the tie flag when untying."""
    for item in sorted(src.iterdir()):
        if (
            not item.is_file()
            or item.name in _SKIP_NAMES
            or item.name.endswith(_SKIP_SUFFIXES)
            or item.name.startswith(".")
        ):
            continue
        try:
            _copy_side_file(item, tmp, untie=untie)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR) and not _is_under(e.filename, tmp):
                raise InvalidCheckpointError(
                    f"cannot read {item} ({e.strerror}): make it readable (chmod u+r) or move it out of the model folder"
                ) from None
            raise


def _is_under(filename: Any, folder: Path) -> bool:
    return filename is not None and str(filename).startswith(str(folder))


def _copy_side_file(item: Path, tmp: Path, *, untie: bool) -> None:
    if item.name == "config.json" and untie:
        config = json.loads(item.read_text(encoding="utf-8"))
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        (tmp / item.name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return
    shutil.copy2(item, tmp / item.name)


def _verify(
    checkpoint: Checkpoint, tmp: Path, plan: EditPlan, stats: dict[str, BlockStats], *, untie: bool
) -> dict[str, Any]:
    """Re-read every output header and check it against the input; check the writers' residuals."""
    expected = {info.name: (info.dtype, info.shape) for _, info in checkpoint.tensors()}
    if untie and plan.embedding:
        emb = checkpoint.find(plan.embedding)[1]
        expected[plan.spec.lm_head] = (emb.dtype, emb.shape)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in checkpoint.shards:
        header = read_header(tmp / shard.path.name)
        for t in header.tensors.values():
            found[t.name] = (t.dtype, t.shape)
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))[:3]
        raise InvalidCheckpointError(f"verification failed: output tensors differ from the input ({diff})")
    worst = 0.0
    for name, s in stats.items():
        info = checkpoint.find(name)[1]
        floor = noise_floor(info.torch_dtype, info.shape[plan.writers[name].rule.axis])
        if s.relative_residual > floor:
            raise InvalidDirectionError(
                f"verification failed: {name} keeps a relative component {s.relative_residual:.2e} along the "
                f"direction (limit {floor:.1e})"
            )
        worst = max(worst, s.relative_residual)
    return {
        "tensors_checked": len(found),
        "writers_edited": sum(1 for s in stats.values() if s.changed),
        "writers_already_orthogonal": sum(1 for s in stats.values() if not s.changed),
        "max_relative_residual": worst,
    }


def _input_card(folder: Path) -> dict[str, Any]:
    """The front matter of the input's model card (its ``license`` and ``language`` carry over to the edit)."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    try:
        import yaml

        text = card.read_text(encoding="utf-8")
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---", 2)[1]) or {}
            return front if isinstance(front, dict) else {}
    except (OSError, ValueError, IndexError, yaml.YAMLError):
        return {}
    return {}


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path.cwd()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _BackgroundHasher:
    """SHA-256 of the input shards on a second thread (hashlib releases the GIL), for provenance.

    Files inside a Hub cache are named by their SHA-256 already; those are not read again.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._hashes: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="weightedit-hash")
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        for path in self._paths:
            real = path.resolve()
            if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
                self._hashes[path.name] = real.name
                continue
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while not self._stop.is_set() and (n := f.readinto(buf)):
                        h.update(view[:n])
            except OSError:
                return
            if self._stop.is_set():
                return
            self._hashes[path.name] = h.hexdigest()

    def result(self) -> dict[str, str]:
        self._thread.join()
        return dict(self._hashes)

    def stop(self) -> None:
        self._stop.set()


@torch.no_grad()
def orthogonalize_model_(
    model: torch.nn.Module, direction: Direction | torch.Tensor, *, tied_embeddings: TiedEmbeddings = "untie"
) -> dict[str, int]:
    """In place: apply the same edit to a model already loaded in memory; return the edited groups.

    The streaming :func:`orthogonalize_checkpoint` is the fast path for checkpoints on disk; this one is
    for a model you already hold (a notebook, a training loop). Tied embeddings are untied by default,
    with the LM head keeping the original matrix.
    """
    config = model.config
    spec = spec_for_config(config)
    vector = direction.vector if isinstance(direction, Direction) else direction
    d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
    r = unit_direction(vector, d_model)
    params = dict(model.named_parameters())
    input_embeddings = model.get_input_embeddings().weight
    output_embeddings = getattr(model.get_output_embeddings(), "weight", None)
    if output_embeddings is not None and output_embeddings is input_embeddings and tied_embeddings == "untie":
        # Give the LM head its own copy of the original matrix before the embedding is edited.
        model.get_output_embeddings().weight = torch.nn.Parameter(input_embeddings.detach().clone())
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    groups: dict[str, int] = {}
    for name, param in params.items():
        m = spec.match(name)
        if m is None:
            continue
        u = r
        if m.norm_name is not None:
            u = effective_direction(r, params[m.norm_name].detach().cpu(), spec.norm_offset)
        data = param.data
        work = data if data.device.type == "cpu" and data.is_contiguous() else data.detach().to("cpu").contiguous()
        project_out_(work, u, m.rule.axis)
        if work is not data:
            data.copy_(work)
        groups[m.rule.group] = groups.get(m.rule.group, 0) + 1
    return dict(sorted(groups.items()))
