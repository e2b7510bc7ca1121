"""Streaming orthogonalization of a safetensors checkpoint.

The rewriter reads one tensor (or one block of rows) at a time: writer tensors are edited
(:mod:`weightedit.edit.kernels`), every other tensor is copied as raw bytes inside the kernel, and each output
shard keeps the input's name, tensor order and byte offsets (:mod:`weightedit.edit.output`). Planning needs the
headers only, so the copy starts at once (:mod:`weightedit.edit.spans`); two lanes then edit and copy side by
side (:mod:`weightedit.edit.writer`), in NumPy, so the edit of a direction file never imports torch. Peak
memory is a few blocks, whatever the model size. The output is built in a temporary sibling folder, every file
of it is flushed to disk, and it is renamed into place only after it is verified (:mod:`weightedit.edit.verify`);
the input is never opened for writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._progress import progress_bar
from ..io.atomic import atomic_output_dir, check_output_path, ensure_free_space, fsync_path
from ..io.checkpoint import Checkpoint
from ..io.hashing import InputHasher, known_sha256, remember_sha256
from ..sources import resolve_model
from ..sources.model import ModelSource
from .direction_file import (
    Direction,
    DirectionHeader,
    check_selection,
    load_direction,
    peek_direction,
    vector_sha256,
)
from .kernels import unit_vector
from .options import TiedEmbeddings, tied_embeddings_option
from .output import BLOCK_BYTES, config_ties, copy_side_files, shard_jobs, write_index
from .plan import EditPlan, plan_edit, writer_targets
from .profile import FULL_EDIT, EditProfile
from .provenance import PROVENANCE_FILE, edit_provenance
from .spans import Pipeline, ShardJob
from .verify import verify_output

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

__all__ = ["EditReport", "orthogonalize", "orthogonalize_checkpoint"]


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


def orthogonalize(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    direction: Direction | torch.Tensor | str | os.PathLike[str],
    *,
    tied_embeddings: TiedEmbeddings | str = TiedEmbeddings.UNTIE,
    overwrite: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    allow_model_mismatch: bool = False,
    allow_failing_filters: bool = False,
    profile: EditProfile | None = None,
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
    known = _known_direction(direction)  # a bad direction file is reported before a download, not after
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=progress)
    return orthogonalize_checkpoint(
        source,
        out_path,
        known,
        tied_embeddings=tied_embeddings,
        overwrite=overwrite,
        allow_model_mismatch=allow_model_mismatch,
        allow_failing_filters=allow_failing_filters,
        profile=profile,
        progress=progress,
        extra_provenance=extra_provenance,
        extra_files=extra_files,
    )


def orthogonalize_checkpoint(
    source: ModelSource | str | os.PathLike[str],
    out: str | os.PathLike[str],
    direction: Direction | DirectionHeader | torch.Tensor | str | os.PathLike[str],
    *,
    tied_embeddings: TiedEmbeddings | str = TiedEmbeddings.UNTIE,
    overwrite: bool = False,
    allow_model_mismatch: bool = False,
    allow_failing_filters: bool = False,
    profile: EditProfile | None = None,
    progress: bool = True,
    extra_provenance: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> EditReport:
    """Write a copy of a local checkpoint with ``direction`` projected out of every residual writer.

    Args:
        source: a resolved :class:`ModelSource` or a local ``save_pretrained`` folder.
        out: output folder; must not exist (unless ``overwrite``) and must not overlap the input.
        direction: a :class:`Direction` (checked against the model), a ``[d_model]`` tensor, or the path of a
            direction file. A safetensors file is checked from its metadata and its vector read with NumPy:
            the edit then needs no torch.
        tied_embeddings: for models whose LM head shares the embedding matrix: ``"untie"`` (default)
            keeps the original matrix as ``lm_head.weight`` so the edit is exact; ``"edit-both"`` edits the
            shared matrix and keeps the checkpoint tied (smaller, not exact).
        overwrite: replace an existing ``out`` once the new one is complete.
        allow_model_mismatch: accept a direction file whose model fingerprint differs.
        allow_failing_filters: accept a direction whose selection failed the KL filter (recorded in
            ``weightedit.json``); without it such a direction is refused before anything is written.
        profile: the share of the direction each writer loses (:mod:`weightedit.edit.profile`); by default the
            direction file's own profile, else the full edit. Recorded in ``weightedit.json``.
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
    tied = tied_embeddings_option(tied_embeddings)
    out = check_output_path(Path(out), inputs=(source.folder, *source.inputs), overwrite=overwrite)

    # Everything up to the start of the copy reads headers, metadata and the direction only (see spans.Pipeline).
    checkpoint = Checkpoint.open(source.folder)
    plan = plan_edit(checkpoint)
    known = _known_direction(direction)
    checks = {"allow_model_mismatch": allow_model_mismatch, "allow_failing_filters": allow_failing_filters}
    # Every check of the direction comes before anything is written: a file's metadata, then its vector (read
    # with NumPy: milliseconds), or a vector in hand.
    if isinstance(known, DirectionHeader):
        _check_direction(known, checkpoint, **checks)
        vector = _vector_from_file(known, checkpoint)
    else:
        vector = _checked_direction(known, checkpoint, **checks)
    if profile is None:
        recorded = vector.record.profile
        profile = recorded if recorded is not None else FULL_EDIT
    scales = {name: profile.weight(m.rule.group, m.layer) for name, m in plan.writers.items()}
    edited = {name for name in plan.writers if scales[name] > 0}
    untie = plan.tied and tied is TiedEmbeddings.UNTIE
    extra_bytes = checkpoint.find(plan.embedding)[1].nbytes if untie and plan.embedding else 0
    ensure_free_space(_existing_ancestor(out), checkpoint.total_bytes + extra_bytes, out)

    hasher = InputHasher([s.path for s in checkpoint.shards], known=known_sha256, remember=remember_sha256)
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            jobs = shard_jobs(
                checkpoint,
                tmp,
                edited=edited,
                axes={n: m.rule.axis for n, m in plan.writers.items()},
                scales=None if profile.is_full else scales,
                preserve_norm=profile.preserve_norm,
                lm_head=(plan.spec.lm_head, plan.embedding) if untie and plan.embedding else None,
                metadata={
                    "weightedit_version": __version__,
                    "weightedit_direction_sha256": vector.sha256,
                    "weightedit_source": source.public_name,
                },
                block_bytes=block_bytes,
            )
            with _started(jobs, f"editing {source.given}", progress=progress) as pipeline:
                # The copy runs while the writers' targets are computed (post-norm writers read their norms).
                from .writer import editor_factory, single_threaded_blas

                targets = {
                    n: u for n, u in writer_targets(checkpoint, plan, vector.unit, vector.layers).items() if n in edited
                }
                with single_threaded_blas():
                    stats, samples = pipeline.finish(editor_factory(jobs, targets))
            _write_side_files(checkpoint, plan, tmp, untie=untie, extra_files=extra_files or {})
            verification = verify_output(checkpoint, tmp, plan, stats, samples, untie=untie)
            provenance = edit_provenance(
                source,
                checkpoint,
                plan,
                vector.record,
                direction_sha256=vector.sha256,
                input_hashes=hasher.result(),
                verification=verification,
                options={
                    "tied_embeddings": tied.value if plan.tied else None,
                    "allow_model_mismatch": bool(allow_model_mismatch),
                    "allow_failing_filters": allow_failing_filters,
                    "edit_profile": profile.to_json(),
                },
                extra=extra_provenance,
            )
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
        # atomic_output_dir flushed every file and folder before the rename, and the parent after it.
    finally:
        hasher.stop()

    edited_count = sum(1 for s in stats.values() if s.changed)
    return EditReport(
        out=out,
        model_type=plan.spec.model_type,
        d_model=checkpoint.d_model,
        groups=plan.groups(),
        tensors_edited=edited_count,
        tensors_already_orthogonal=len(stats) - edited_count,
        tensors_copied=sum(len(s.tensors) for s in checkpoint.shards) - len(stats),
        bytes_written=sum(j.size for j in jobs),
        max_relative_residual=verification["max_relative_residual"],
        tied_embeddings=(tied.value if plan.tied else None),
        seconds=time.perf_counter() - started,
        provenance=provenance,
    )


def _known_direction(
    direction: Direction | DirectionHeader | torch.Tensor | str | os.PathLike[str],
) -> Direction | DirectionHeader | torch.Tensor:
    """A direction object, file header or tensor as it is; a file's metadata when it can be read without torch,
    else the loaded file."""
    if not isinstance(direction, (str, os.PathLike)):
        return direction
    path = Path(direction)
    header = peek_direction(path)
    if header is None:  # another format, or a file load_direction has to judge (it names the problem)
        loaded = load_direction(path)
        loaded.meta.setdefault("file", path.name)
        return loaded
    header.meta.setdefault("file", path.name)
    return header


def _direction_name(direction: Direction | DirectionHeader) -> str:
    file = direction.meta.get("file") if isinstance(direction.meta, dict) else None
    return f"direction {file}" if file else "the direction"


def _check_direction(
    direction: Direction | DirectionHeader,
    checkpoint: Checkpoint,
    *,
    allow_model_mismatch: bool,
    allow_failing_filters: bool,
) -> None:
    direction.check_model(checkpoint.config, allow_mismatch=allow_model_mismatch)
    check_selection(direction, allow_failing_filters=allow_failing_filters, source=_direction_name(direction))


@dataclass(frozen=True)
class _Vector:
    """The direction as the edit uses it: what the record says of it, the hash of its vector, its unit vector."""

    record: Direction | DirectionHeader
    sha256: str
    unit: NDArray
    layers: NDArray | None = None  # unit rows, one per decoder layer (Direction.layer_vectors)


def _checked_direction(
    direction: Direction | torch.Tensor,
    checkpoint: Checkpoint,
    *,
    allow_model_mismatch: bool,
    allow_failing_filters: bool,
) -> _Vector:
    """A direction in hand (checked against the model and its selection record) and its unit vector; a
    ``[n_layers, d_model]`` tensor is a per-layer direction whose row 0 serves the embeddings."""
    import torch

    from .kernels import unit_rows
    from .projection import unit_direction

    if not isinstance(direction, Direction) and direction.ndim == 2 and direction.shape[0] > 1:
        # [n_layers, d_model]: per-layer rows, row 0 for the embeddings (as the in-memory edit reads it)
        direction = Direction(vector=direction[0], layer_vectors=direction)
    if isinstance(direction, Direction):
        _check_direction(
            direction,
            checkpoint,
            allow_model_mismatch=allow_model_mismatch,
            allow_failing_filters=allow_failing_filters,
        )
        unit = unit_direction(direction.vector, checkpoint.d_model)
        layers = None
        if direction.layer_vectors is not None:
            rows = direction.layer_vectors.detach().to("cpu", torch.float64).numpy()
            layers = unit_rows(rows, checkpoint.d_model, name=_direction_name(direction))
        return _Vector(direction, direction.sha256(), unit.numpy(), layers)
    r = unit_direction(direction, checkpoint.d_model)
    record = Direction(vector=r)
    return _Vector(record, record.sha256(), r.numpy())


def _vector_from_file(header: DirectionHeader, checkpoint: Checkpoint) -> _Vector:
    """The vector of a direction file whose metadata was checked already, read without torch."""
    from .kernels import unit_rows

    vector, rows = header.load_vector(), header.load_rows()
    name = _direction_name(header)
    unit = unit_vector(vector, checkpoint.d_model, name=name)
    layers = None if rows is None else unit_rows(rows, checkpoint.d_model, name=name)
    return _Vector(header, vector_sha256(vector, rows), unit, layers)


@contextlib.contextmanager
def _started(jobs: list[ShardJob], description: str, *, progress: bool) -> Iterator[Pipeline]:
    """A started :class:`Pipeline` with progress, each finished shard flushed to disk in the background; on
    any failure (or Ctrl-C) both lanes are stopped before the output folder is removed."""
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightedit-fsync")
    pending: list[Future[None]] = []
    try:
        with progress_bar(description, sum(j.size for j in jobs), enabled=progress, unit="bytes") as bar:
            pipeline = Pipeline(
                jobs,
                advance=bar.advance,
                on_shard_written=lambda path: pending.append(syncer.submit(fsync_path, path)),
            )
            try:
                pipeline.start()
                yield pipeline
            except Exception as e:
                pipeline.cancel()
                lane = pipeline.failure
                if lane is not None and lane is not e:  # a disk error in the copy lane comes before its consequences
                    raise lane from e
                raise
            except BaseException:
                pipeline.cancel()
                raise
            for fut in pending:
                fut.result()  # re-raises a failed flush (e.g. the disk filled up)
    finally:
        syncer.shutdown(wait=True, cancel_futures=True)


def _write_side_files(
    checkpoint: Checkpoint, plan: EditPlan, tmp: Path, *, untie: bool, extra_files: dict[str, Path]
) -> None:
    """The index, the configs, tokenizer and other side files, and the caller's extra files."""
    write_index(checkpoint, tmp, lm_head=plan.spec.lm_head if untie else None, embedding=plan.embedding)
    # A config that says "tied" beside a stored lm_head would make transformers read the edited embedding
    # as the head instead of the stored one; the stored head is what this edit keeps, so say untied.
    stale_tie = plan.embedding is not None and not plan.tied and config_ties(checkpoint.config)
    copy_side_files(checkpoint.folder, tmp, untie=untie or stale_tie)
    for name, path in extra_files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tmp / name)


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path.cwd()
