"""Undoing a fine-tune's change to the residual-stream writers: the weight-delta strip of ``verify-defence``.

A defence trained from a base model changes its weights by ``Δ = W_defended - W_base``. For each writer, the best
rank-``k`` approximation of ``Δ`` (its top ``k`` singular triplets) is removed, ``W ← W_defended - Δ_k``; every
other tensor is copied. A defence whose robustness lives in a low-rank change to the writers (a LoRA, a short
fine-tune) is largely undone, and the result can then be edited like any model. ``k`` large enough to cover the
whole change gives back the base model's writers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InvalidCheckpointError
from ..io.atomic import atomic_output_dir
from ..io.checkpoint import Checkpoint
from .plan import plan_edit

__all__ = ["strip_delta"]


def _low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a matrix (exact SVD: writers are at most a few thousand wide)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    return (u[:, :k] * s[:k]) @ vh[:k]


def strip_delta(
    defended: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str], *, rank: int
) -> dict[str, float]:
    """Write ``defended`` with the rank-``rank`` part of its change from ``base`` removed from every writer.

    Returns, per writer, the share of ``‖Δ‖`` removed (1 when the change had rank ≤ ``rank``).

    Raises:
        InvalidCheckpointError: the two checkpoints do not hold the same writers with the same shapes.
    """
    if rank < 1:
        raise InvalidCheckpointError(f"the delta rank must be at least 1, got {rank}")
    ours, theirs = Checkpoint.open(defended), Checkpoint.open(base)
    plan = plan_edit(ours)
    removed: dict[str, float] = {}
    with atomic_output_dir(Path(out)) as tmp:
        for shard in ours.shards:
            tensors: dict[str, torch.Tensor] = {}
            for info in shard.ordered():
                tensor = ours.read_tensor(info.name)
                if info.name in plan.writers and tensor.dim() >= 2:
                    try:
                        other = theirs.read_tensor(info.name)
                    except KeyError:
                        raise InvalidCheckpointError(
                            f"the base model {theirs.folder} has no {info.name!r}: pass the model the defence was "
                            "trained from",
                            path=theirs.folder,
                        ) from None
                    if other.shape != tensor.shape:
                        raise InvalidCheckpointError(
                            f"{info.name!r} is {list(tensor.shape)} in the defended model but {list(other.shape)} in "
                            f"the base model {theirs.folder}: pass the model the defence was trained from",
                            path=theirs.folder,
                        )
                    work = tensor.double()
                    delta = work - other.double()
                    flat = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 2 else delta
                    low = _low_rank(flat, rank).reshape(delta.shape)
                    norm = float(delta.norm())
                    removed[info.name] = float(low.norm()) / norm if norm > 0 else 1.0
                    tensor = (work - low).to(tensor.dtype)
                tensors[info.name] = tensor.contiguous()
            save_file(tensors, str(tmp / shard.path.name), metadata=dict(shard.metadata) or None)
        # Configs, tokenizer and the index (same shards, names and sizes) are copied as they are.
        for item in sorted(ours.folder.iterdir()):
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != "weightedit.json":
                shutil.copy2(item, tmp / item.name)
    return removed
