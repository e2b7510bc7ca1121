"""Checking an edit's output before it is renamed into place."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidCheckpointError, InvalidDirectionError
from ..io.checkpoint import Checkpoint, read_header
from .plan import EditPlan
from .spans import Sample, check_samples, noise_floor_for

if TYPE_CHECKING:
    from .kernels import BlockStats

__all__ = ["verify_output"]


def verify_output(
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
        assert info.is_float  # plan_edit refuses writers of other dtypes
        floor = noise_floor_for(info.dtype, info.shape[plan.writers[name].rule.axis])
        if not math.isfinite(s.relative_residual):
            raise InvalidCheckpointError(
                f"{name} holds NaN or infinite values, so its edit cannot be checked: the input checkpoint is "
                "damaged; re-download or re-save it",
                path=checkpoint.find(name)[0].path,
            )
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
