"""What an edit will do, decided from the checkpoint's headers alone (used by ``inspect`` and the rewrite).

Nothing here imports torch (:func:`writer_targets` reads norm weights with NumPy), so the rewrite plans,
copies and edits without it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidCheckpointError, InvalidDirectionError
from ..io.checkpoint import Checkpoint, TensorInfo
from .arch import ArchSpec, WriterMatch, spec_for_config
from .options import TiedEmbeddings

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["EditPlan", "TiedEmbeddings", "plan_edit", "writer_targets", "check_layer_row"]


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
        if not info.is_float:
            raise InvalidCheckpointError(
                f"writer {name!r} has dtype {info.dtype}: weightedit edits float tensors; use an unquantized checkpoint",
                path=checkpoint.folder,
            )
        if not info.shape or info.shape[m.rule.axis] != d_model:
            raise InvalidCheckpointError(
                f"writer {name!r} has shape {list(info.shape)}, expected size {d_model} on axis {m.rule.axis}: "
                f"the {spec.model_type} registry entry does not fit this checkpoint",
                path=checkpoint.folder,
            )
        if m.norm_name is not None and m.norm_name not in checkpoint.weight_map:
            raise InvalidCheckpointError(
                f"post-norm writer {name!r} needs {m.norm_name!r}, which is not in the checkpoint",
                path=checkpoint.folder,
            )
        writers[name] = m
    if not writers:
        raise InvalidCheckpointError(
            f"no residual-stream writers found among {len(names)} tensors of this {spec.model_type} checkpoint: "
            "its tensor names do not follow the transformers layout",
            path=checkpoint.folder,
        )
    tied = embedding is not None and spec.lm_head not in checkpoint.weight_map
    return EditPlan(checkpoint=checkpoint, spec=spec, writers=writers, tied=tied, embedding=embedding)


def check_layer_row(writer: str, layer: int, n_rows: int) -> int:
    """``layer``, checked to be a row of a per-layer direction with ``n_rows`` rows.

    Raises:
        InvalidDirectionError: the direction has no row for the writer's decoder layer.
    """
    if not 0 <= layer < n_rows:
        raise InvalidDirectionError(
            f"writer {writer!r} is in decoder layer {layer} but the direction has {n_rows} layer rows: "
            "use a direction computed on this model (weightedit optimize --model ...)"
        )
    return layer


def writer_targets(
    checkpoint: Checkpoint, plan: EditPlan, r: NDArray, layers: NDArray | None = None
) -> dict[str, NDArray]:
    """The unit vector each writer is projected against: ``r`` (a unit float32 vector), or with ``layers`` (unit
    rows ``[n_layers, d_model]``) row ``l`` for the writers of decoder layer ``l`` (``r`` for the embeddings);
    for post-norm writers the normalized ``γ ⊙ v`` of the norm that follows them (one per norm tensor and vector,
    read once)."""
    from .kernels import effective_vector

    norm_cache: dict[tuple[str, int | None], NDArray] = {}
    targets: dict[str, NDArray] = {}
    for name, m in plan.writers.items():
        row = None
        v = r
        if layers is not None and m.layer is not None:
            row = check_layer_row(name, m.layer, len(layers))
            v = layers[row]
        if m.norm_name is None:
            targets[name] = v
            continue
        key = (m.norm_name, row)
        if key not in norm_cache:
            norm_cache[key] = effective_vector(v, checkpoint.read_array(m.norm_name), plan.spec.norm_offset)
        targets[name] = norm_cache[key]
    return targets
