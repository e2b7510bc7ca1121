"""Streaming orthogonalization of a safetensors checkpoint.

The rewriter reads one tensor (or one block of rows) at a time: writer tensors are edited
(:mod:`weightedit.edit`), every other tensor is copied as raw bytes inside the kernel, and each output
shard keeps the input's name, tensor order and byte offsets. Reading and editing the next block overlaps
with writing the current one (:mod:`weightedit._writer`); peak memory is a few blocks, whatever the model
size. The output is built in a temporary sibling folder, every file of it is flushed to disk, and it is
renamed into place only after it is verified; the input is never opened for writing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from .. import __version__
from .._progress import progress_bar
from ..errors import InvalidCheckpointError, InvalidDirectionError
from ..io.atomic import atomic_output_dir, check_output_path, ensure_free_space
from ..io.checkpoint import (
    WEIGHTS_INDEX_NAME,
    Checkpoint,
    ShardHeader,
    TensorInfo,
    encode_header,
    read_header,
    residual_width,
)
from ..io.hashing import known_sha256, remember_sha256
from ..sources import card_front_matter, resolve_model
from ..sources.model import ModelSource, public_name
from .arch import ArchSpec, WriterMatch, spec_for_config
from .direction_file import Direction, check_selection
from .projection import BlockStats, effective_direction, noise_floor, project_out_, unit_direction
from .writer import CopySpan, EditSpan, InputHasher, Sample, ShardJob, check_samples, write_shards

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
_BLOCK_BYTES = 2 << 20  # rows per block of a row-local writer: small enough to stay in the CPU cache


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

    hasher = InputHasher([s.path for s in checkpoint.shards], known=known_sha256, remember=remember_sha256)
    # Flushing a finished shard to disk overlaps with writing the next one.
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightedit-fsync")
    pending_syncs: list[Future[None]] = []
    shard_meta = {
        "weightedit_version": __version__,
        "weightedit_direction_sha256": direction.sha256(),
        "weightedit_source": source.public_name,
    }
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            jobs = _shard_jobs(
                checkpoint,
                tmp,
                targets=targets,
                axes={n: m.rule.axis for n, m in plan.writers.items()},
                lm_head=(plan.spec.lm_head, plan.embedding) if untie and plan.embedding else None,
                metadata=shard_meta,
                block_bytes=block_bytes,
            )
            slab = max((sp.length for j in jobs for sp in j.spans if isinstance(sp, EditSpan)), default=0)
            total = sum(j.size for j in jobs)
            with progress_bar(f"editing {source.given}", total, enabled=progress, unit="bytes") as bar:
                stats_total, samples = write_shards(
                    jobs,
                    slab_bytes=slab,
                    advance=bar.advance,
                    on_shard_written=lambda path: pending_syncs.append(syncer.submit(_fsync_file, path)),
                )
                for fut in pending_syncs:
                    fut.result()  # re-raises a failed flush (e.g. the disk filled up)
            bytes_written = sum(j.size for j in jobs)
            _write_index(checkpoint, tmp, lm_head=plan.spec.lm_head if untie else None, embedding=plan.embedding)
            # A config that says "tied" beside a stored lm_head would make transformers read the edited embedding
            # as the head instead of the stored one; the stored head is what this edit keeps, so say untied.
            stale_tie = plan.embedding is not None and not plan.tied and _config_ties(checkpoint.config)
            _copy_side_files(checkpoint.folder, tmp, untie=untie or stale_tie)
            for name, path in (extra_files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / name)
            # The shards are flushed already; flush every other file (config, index, tokenizer, extras).
            shard_paths = {j.dest for j in jobs}
            for item in sorted(tmp.rglob("*")):
                if item.is_file() and item not in shard_paths:
                    _fsync_file(item)
                elif item.is_dir():
                    _fsync_dir(item)
            verification = _verify(checkpoint, tmp, plan, stats_total, samples, untie=untie)
            input_hashes = hasher.result()
            provenance = {
                "weightedit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": {
                    **source.provenance(),
                    "license": source.details.get("license") or card_front_matter(checkpoint.folder).get("license"),
                    "language": source.details.get("language") or card_front_matter(checkpoint.folder).get("language"),
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
            _fsync_file(tmp / "weightedit.json")
            _fsync_dir(tmp)
        _fsync_dir(out.parent)  # makes the rename itself durable
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


def _shard_jobs(
    checkpoint: Checkpoint,
    tmp: Path,
    *,
    targets: dict[str, torch.Tensor],
    axes: dict[str, int],
    lm_head: tuple[str, str] | None,
    metadata: dict[str, str],
    block_bytes: int,
) -> list[ShardJob]:
    """Describe each output shard: same tensors at the same offsets, writers edited, the LM head appended.

    ``lm_head`` is ``(name, embedding)`` when untying: the shard holding the embedding gets a copy of its
    original bytes under the LM head's name, after its last tensor.
    """
    jobs = []
    for shard in checkpoint.shards:
        ordered = shard.ordered()
        end = ordered[-1].end if ordered else 0
        entries = [(t.name, t.dtype, t.shape, t.start, t.end) for t in ordered]
        extras: list[TensorInfo] = []
        if lm_head is not None and lm_head[1] in shard.tensors:
            info = shard.tensors[lm_head[1]]
            entries.append((lm_head[0], info.dtype, info.shape, end, end + info.nbytes))
            extras.append(info)
        spans: list[CopySpan | EditSpan] = []

        def copy(offset: int, length: int, spans: list[CopySpan | EditSpan] = spans) -> None:
            last = spans[-1] if spans else None
            if isinstance(last, CopySpan) and last.offset + last.length == offset:
                spans[-1] = CopySpan(last.offset, last.length + length)  # one call for a run of tensors
            else:
                spans.append(CopySpan(offset, length))

        for info in ordered:
            if info.name in targets:
                spans.extend(_edit_spans(shard, info, targets[info.name], axes[info.name], block_bytes))
            elif info.nbytes:
                copy(shard.data_start + info.start, info.nbytes)
        for info in extras:
            copy(shard.data_start + info.start, info.nbytes)
        header = encode_header(entries, {**shard.metadata, **metadata})
        jobs.append(ShardJob(src=shard.path, dest=tmp / shard.path.name, header=header, spans=spans))
    return jobs


def _edit_spans(shard: ShardHeader, info: TensorInfo, u: torch.Tensor, axis: int, block_bytes: int) -> list[EditSpan]:
    """One writer tensor as edit spans.

    Row-local tensors (embeddings, Conv1D: the residual axis is the last one) become blocks of whole rows;
    tensors whose residual axis comes earlier (``nn.Linear`` ``[d, d_in]``, expert stacks ``[E, d, d_in]``)
    become one span per ``[d, d_in]`` matrix, streamed in blocks of rows; anything else (biases) is one span.
    """
    dtype = info.torch_dtype
    assert dtype is not None  # plan_edit refuses writers of other dtypes
    d = info.shape[axis]
    floor = noise_floor(dtype, d)
    axis = axis % len(info.shape)
    start = shard.data_start + info.start
    inner = math.prod(info.shape[axis + 1 :])
    if axis == len(info.shape) - 1 and len(info.shape) > 1 and info.nbytes:
        rows = info.shape[0]
        row_bytes = info.nbytes // rows
        step = max(1, block_bytes // row_bytes)
        return [
            EditSpan(
                info.name,
                start + r0 * row_bytes,
                (min(rows, r0 + step) - r0) * row_bytes,
                dtype,
                (min(rows, r0 + step) - r0, *info.shape[1:]),
                u,
                axis,
                floor,
                mode="rows",
            )
            for r0 in range(0, rows, step)
        ]
    if inner > 1 and info.nbytes:
        outer = math.prod(info.shape[:axis])
        size = info.nbytes // outer
        return [
            EditSpan(info.name, start + i * size, size, dtype, (d, inner), u, 0, floor, mode="columns")
            for i in range(outer)
        ]
    return [EditSpan(info.name, start, info.nbytes, dtype, info.shape, u, axis, floor, mode="whole")]


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
    checkpoint: Checkpoint,
    tmp: Path,
    plan: EditPlan,
    stats: dict[str, BlockStats],
    samples: list[Sample],
    *,
    untie: bool,
) -> dict[str, Any]:
    """Check the output before it is renamed into place.

    Every output header must list the input's tensors; every writer's residual along the direction must be
    below its dtype's noise floor; and a sample of the written bytes (start, middle and end of each edited
    block and of each copied range) must match what was computed or copied.
    """
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
        dtype = info.torch_dtype
        assert dtype is not None  # plan_edit refuses writers of other dtypes
        floor = noise_floor(dtype, info.shape[plan.writers[name].rule.axis])
        if s.relative_residual > floor:
            raise InvalidDirectionError(
                f"verification failed: {name} keeps a relative component {s.relative_residual:.2e} along the "
                f"direction (limit {floor:.1e})"
            )
        worst = max(worst, s.relative_residual)
    checked = check_samples(samples)
    return {
        "tensors_checked": len(found),
        "byte_samples_checked": checked,
        "writers_edited": sum(1 for s in stats.values() if s.changed),
        "writers_already_orthogonal": sum(1 for s in stats.values() if not s.changed),
        "max_relative_residual": worst,
    }


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


class CausalLM(Protocol):
    """What :func:`orthogonalize_model_` needs of a loaded model (a transformers ``*ForCausalLM``)."""

    config: Any

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...
    def get_input_embeddings(self) -> torch.nn.Module: ...
    def get_output_embeddings(self) -> torch.nn.Module | None: ...


@torch.no_grad()
def orthogonalize_model_(
    model: CausalLM, direction: Direction | torch.Tensor, *, tied_embeddings: TiedEmbeddings = "untie"
) -> dict[str, int]:
    """In place: apply the same edit to a model already loaded in memory; return the edited groups.

    The streaming :func:`orthogonalize_checkpoint` is the fast path for checkpoints on disk; this one is
    for a model you already hold (a notebook, a training loop). Tied embeddings are untied by default,
    with the LM head keeping the original matrix.
    """
    config = model.config
    spec = spec_for_config(config)
    vector = direction.vector if isinstance(direction, Direction) else direction
    d_model = residual_width(config)
    if d_model is None:
        raise InvalidCheckpointError("the model's config has no hidden_size: cannot tell the residual-stream width")
    r = unit_direction(vector, d_model)
    params = dict(model.named_parameters())
    input_embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    output_embeddings = getattr(head, "weight", None)
    if head is not None and output_embeddings is input_embeddings and tied_embeddings == "untie":
        # Give the LM head its own copy of the original matrix before the embedding is edited.
        assert isinstance(input_embeddings, torch.Tensor)
        head.weight = torch.nn.Parameter(input_embeddings.detach().clone())
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
