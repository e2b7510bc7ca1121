"""The same edit on a model already loaded in memory (a notebook, a training loop)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..errors import InvalidCheckpointError
from ..io.checkpoint import residual_width
from .arch import spec_for_config
from .direction_file import Direction
from .options import TiedEmbeddings, tied_embeddings_option
from .profile import FULL_EDIT, EditProfile
from .projection import effective_direction, project_out_, unit_direction

__all__ = ["CausalLM", "orthogonalize_model_"]


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
    default the direction's own profile, else the full edit).
    """
    config = model.config
    spec = spec_for_config(config)
    vector = direction.vector if isinstance(direction, Direction) else direction
    d_model = residual_width(config)
    if d_model is None:
        raise InvalidCheckpointError("the model's config has no hidden_size: cannot tell the residual-stream width")
    r = unit_direction(vector, d_model)
    if profile is None:
        profile = (direction.profile if isinstance(direction, Direction) else None) or FULL_EDIT
    params = dict(model.named_parameters())
    input_embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    output_embeddings = getattr(head, "weight", None)
    if (
        head is not None
        and output_embeddings is input_embeddings
        and tied_embeddings_option(tied_embeddings) is TiedEmbeddings.UNTIE
    ):
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
        scale = profile.weight(m.rule.group, m.layer)
        if scale == 0:
            continue
        u = r
        if m.norm_name is not None:
            u = effective_direction(r, params[m.norm_name].detach().cpu(), spec.norm_offset)
        data = param.data
        work = data if data.device.type == "cpu" and data.is_contiguous() else data.detach().to("cpu").contiguous()
        project_out_(work, u, m.rule.axis, scale=scale, preserve_norm=profile.preserve_norm)
        if work is not data:
            data.copy_(work)
        groups[m.rule.group] = groups.get(m.rule.group, 0) + 1
    return dict(sorted(groups.items()))
