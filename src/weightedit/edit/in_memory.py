"""The same edit on a model already loaded in memory (a notebook, a training loop)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..errors import InvalidCheckpointError, InvalidDirectionError
from ..io.checkpoint import decoder_depth, residual_width
from .arch import spec_for_config
from .direction_file import Direction
from .kernels import unit_rows
from .options import TiedEmbeddings, tied_embeddings_option
from .plan import check_layer_row
from .profile import FULL_EDIT, EditProfile
from .projection import effective_direction, project_out_, unit_direction

__all__ = ["CausalLM", "orthogonalize_model_", "untie_embeddings_", "temporarily_edited"]


class CausalLM(Protocol):
    """What :func:`orthogonalize_model_` needs of a loaded model (a transformers ``*ForCausalLM``)."""

    config: Any

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...
    def get_input_embeddings(self) -> torch.nn.Module: ...
    def get_output_embeddings(self) -> torch.nn.Module | None: ...


@torch.no_grad()
def orthogonalize_model_(
    model: CausalLM,
    direction: Direction | torch.Tensor,
    *,
    tied_embeddings: TiedEmbeddings | str = TiedEmbeddings.UNTIE,
    profile: EditProfile | None = None,
) -> dict[str, int]:
    """In place: apply the same edit to a model already loaded in memory; return the edited groups.

    The streaming :func:`orthogonalize_checkpoint` is the fast path for checkpoints on disk; this one is
    for a model you already hold (a notebook, a training loop). Tied embeddings are untied by default,
    with the LM head keeping the original matrix. ``profile`` shapes the edit as in the streaming rewrite (by
    default the direction's own profile, else the full edit). A direction with per-layer rows (a
    :class:`Direction` with ``layer_vectors``, or a ``[n_layers, d_model]`` tensor whose row 0 then serves the
    embeddings) edits each decoder layer's writers along its own row.
    """
    units = _unit(model, direction)
    if profile is None:
        profile = (direction.profile if isinstance(direction, Direction) else None) or FULL_EDIT
    if tied_embeddings_option(tied_embeddings) is TiedEmbeddings.UNTIE:
        untie_embeddings_(model)
    groups: dict[str, int] = {}
    for _, param, group, edit in _writer_edits(model, units, profile):
        edit(param.data)
        groups[group] = groups.get(group, 0) + 1
    return dict(sorted(groups.items()))


def _unit(model: CausalLM, direction: Direction | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit direction of the embeddings, and the unit rows of the decoder layers (``None``: all use the
    first). A ``[n_layers, d_model]`` tensor gives each decoder layer its row, and the embeddings row 0."""
    d_model = residual_width(model.config)
    if d_model is None:
        raise InvalidCheckpointError("the model's config has no hidden_size: cannot tell the residual-stream width")
    if isinstance(direction, Direction):
        vector, layers = direction.vector, direction.layer_vectors
    elif direction.ndim == 2 and direction.shape[0] > 1:
        vector, layers = direction[0], direction
    else:
        vector, layers = direction, None
    rows = None
    if layers is not None:
        depth = decoder_depth(model.config)
        if depth is not None and len(layers) != depth:
            raise InvalidDirectionError(
                f"the direction has directions for {len(layers)} decoder layers but the model has {depth}: use a "
                "direction computed on this model (weightedit optimize --model ...)"
            )
        rows = torch.from_numpy(
            unit_rows(layers.detach().to("cpu", torch.float64).numpy(), d_model, name="the direction")
        )
    return unit_direction(vector, d_model), rows


def untie_embeddings_(model: CausalLM) -> bool:
    """Give a tied LM head its own copy of the embedding matrix, so that editing the embedding leaves the head as
    it was (what the default streaming edit writes). Returns whether the model was tied."""
    input_embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is not input_embeddings:
        return False
    assert isinstance(input_embeddings, torch.Tensor)
    head.weight = torch.nn.Parameter(input_embeddings.detach().clone())
    config = model.config
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False
    return True


def _writer_edits(
    model: CausalLM, units: tuple[torch.Tensor, torch.Tensor | None], profile: EditProfile
) -> Iterator[tuple[str, Any, str, Any]]:
    """Each writer parameter the profile edits, with its group and a function that edits a tensor of it in place
    (``units``: from :func:`_unit`)."""
    spec = spec_for_config(model.config)
    params = dict(model.named_parameters())
    r, layers = units
    for name, param in params.items():
        m = spec.match(name)
        if m is None:
            continue
        scale = profile.weight(m.rule.group, m.layer)
        if scale == 0:
            continue
        u = r
        if layers is not None and m.layer is not None:
            u = layers[check_layer_row(name, m.layer, len(layers))]
        if m.norm_name is not None:
            u = effective_direction(u, params[m.norm_name].detach().cpu(), spec.norm_offset)

        def edit(data: torch.Tensor, u: torch.Tensor = u, axis: int = m.rule.axis, scale: float = scale) -> None:
            work = data if data.device.type == "cpu" and data.is_contiguous() else data.detach().to("cpu").contiguous()
            project_out_(work, u, axis, scale=scale, preserve_norm=profile.preserve_norm)
            if work is not data:
                data.copy_(work)

        yield name, param, m.rule.group, edit


@contextlib.contextmanager
@torch.no_grad()
def temporarily_edited(model: CausalLM, direction: Direction | torch.Tensor, profile: EditProfile) -> Iterator[None]:
    """Within the block, ``model`` is edited in place as :func:`orthogonalize_model_` edits it; afterwards every
    edited parameter is exactly what it was. A tied model must be untied first (:func:`untie_embeddings_`), or the
    edit would reach the LM head."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight:
        raise InvalidCheckpointError("temporarily_edited needs an untied model: call untie_embeddings_ first")
    units = _unit(model, direction)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for _, param, _, edit in _writer_edits(model, units, profile):
            saved.append((param.data, param.data.clone()))
            edit(param.data)
        yield
    finally:
        for data, original in saved:
            data.copy_(original)
