"""The output folder of an edit, besides the bytes of its shards: how each shard is cut into copy and edit spans,
the index, and the side files (configs, tokenizer, chat template, remote code)."""

from __future__ import annotations

import errno
import json
import math
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..errors import InvalidCheckpointError
from ..io.checkpoint import WEIGHTS_INDEX_NAME, Checkpoint, ShardHeader, TensorInfo, encode_header, read_header
from .spans import CopySpan, EditSpan, ShardJob, noise_floor_for

__all__ = ["BLOCK_BYTES", "shard_jobs", "write_index", "config_ties", "copy_side_files"]

# Files of a model folder that are never copied to the output: weights in other formats (they would
# not be edited), the base model's card (the output gets its own), and the input's provenance.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".incomplete")
_SKIP_NAMES = {WEIGHTS_INDEX_NAME, "README.md", "weightedit.json", "weightedit-gguf.json", ".gitattributes"}
BLOCK_BYTES = 2 << 20  # rows per block of a row-local writer: small enough to stay in the CPU cache


def shard_jobs(
    checkpoint: Checkpoint,
    tmp: Path,
    *,
    edited: Collection[str],
    axes: dict[str, int],
    lm_head: tuple[str, str] | None,
    metadata: dict[str, str],
    block_bytes: int,
    scales: dict[str, float] | None = None,
    preserve_norm: bool = False,
) -> list[ShardJob]:
    """Describe each output shard: same tensors at the same offsets, the ``edited`` writers edited, the LM
    head appended. Needs the headers only (no torch): the vectors come with the editor.

    ``scales`` gives the share of the component each writer loses (1 where missing: the full edit), and
    ``preserve_norm`` whether edited vectors keep their length (:mod:`weightedit.edit.profile`).

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
            if info.name in edited and info.nbytes:
                scale = 1.0 if scales is None else scales.get(info.name, 1.0)
                spans.extend(_edit_spans(shard, info, axes[info.name], block_bytes, scale=scale, keep=preserve_norm))
            elif info.nbytes:
                copy(shard.data_start + info.start, info.nbytes)
        for info in extras:
            copy(shard.data_start + info.start, info.nbytes)
        header = encode_header(entries, {**shard.metadata, **metadata})
        jobs.append(ShardJob(src=shard.path, dest=tmp / shard.path.name, header=header, spans=spans))
    return jobs


def _edit_spans(
    shard: ShardHeader,
    info: TensorInfo,
    axis: int,
    block_bytes: int,
    *,
    scale: float = 1.0,
    keep: bool = False,
) -> list[EditSpan]:
    """One writer tensor as edit spans.

    Row-local tensors (embeddings, Conv1D: the residual axis is the last one) become blocks of whole rows;
    tensors whose residual axis comes earlier (``nn.Linear`` ``[d, d_in]``, expert stacks ``[E, d, d_in]``)
    become one span per ``[d, d_in]`` matrix, streamed in blocks of rows; anything else (biases) is one span.
    """
    assert info.is_float  # plan_edit refuses writers of other dtypes
    dtype = info.dtype
    d = info.shape[axis]
    floor = noise_floor_for(dtype, d)
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
                axis,
                floor,
                mode="rows",
                scale=scale,
                preserve_norm=keep,
            )
            for r0 in range(0, rows, step)
        ]
    if inner > 1 and info.nbytes:
        outer = math.prod(info.shape[:axis])
        size = info.nbytes // outer
        return [
            EditSpan(
                info.name,
                start + i * size,
                size,
                dtype,
                (d, inner),
                0,
                floor,
                mode="columns",
                scale=scale,
                preserve_norm=keep,
            )
            for i in range(outer)
        ]
    return [
        EditSpan(
            info.name,
            start,
            info.nbytes,
            dtype,
            info.shape,
            axis,
            floor,
            mode="whole",
            scale=scale,
            preserve_norm=keep,
        )
    ]


def write_index(checkpoint: Checkpoint, tmp: Path, *, lm_head: str | None, embedding: str | None) -> None:
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


def config_ties(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` asks for tied embeddings (or leaves it to a class default that may be true)."""
    configs = [config, *([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])]
    return any(c.get("tie_word_embeddings", True) is not False for c in configs)


def copy_side_files(src: Path, tmp: Path, *, untie: bool) -> None:
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
                    f"cannot read {item} ({e.strerror}): make it readable (chmod u+r) or move it out of the model folder",
                    path=item,
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
