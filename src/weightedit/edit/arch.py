"""Architecture registry: which tensors of each model family write to the residual stream.

One frozen :class:`ArchSpec` per family, keyed by ``config.model_type``. Adding a family means adding one
entry here and letting the parametrized tiny-model tests pick it up.

A *writer* is a tensor whose output is added to the residual stream. The edit removes the refusal
direction from the writer's output space, which lies along one axis of the stored tensor:

- ``nn.Linear`` weight ``[d_model, d_in]`` (``o_proj``, ``down_proj``, ``w2``): axis 0;
- embeddings ``[vocab, d_model]`` and GPT-2 ``Conv1D`` weights ``[d_in, d_model]``: axis -1;
- biases ``[d_model]``: axis 0 (= -1);
- fused expert stacks ``[n_experts, d_model, d_ff]`` (transformers' in-memory MoE layout): axis -2.

Post-norm families (Gemma 2/3, OLMo 2) pass a writer's output through an RMSNorm with weight γ before it
reaches the residual. For those writers the rule names the norm tensor, and the edit projects against
``γ ⊙ r`` instead of ``r`` (``docs/architecture.md``, "The edit").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedArchitectureError

__all__ = [
    "ArchSpec",
    "WriterRule",
    "WriterMatch",
    "register",
    "get_spec",
    "families",
    "spec_for_config",
]

# Any module prefix ("model.", "transformer.", "language_model.model.", or none).
_PREFIX = r"(?P<prefix>(?:[\w.]+\.)?)"
_LAYER = r"(?P<layer>\d+)"


@dataclass(frozen=True)
class WriterRule:
    """One kind of residual-stream writer.

    Args:
        pattern: regular expression that must match the whole tensor name.
        axis: the axis of the tensor that lives in the residual stream (d_model).
        group: short label used in reports ("embedding", "attn_out", "mlp_out", ...).
        post_norm: for post-norm writers, a template naming the norm tensor whose weight scales this
            writer's output, filled from the pattern's named groups (``"{prefix}layers.{layer}.x.weight"``).
    """

    pattern: str
    axis: int
    group: str
    post_norm: str | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern))  # the dataclass is frozen

    def match(self, name: str) -> re.Match[str] | None:
        return self._regex.fullmatch(name)


@dataclass(frozen=True)
class WriterMatch:
    """A tensor name matched to the rule that makes it a writer."""

    name: str
    rule: WriterRule
    norm_name: str | None
    layer: int | None = None  # the decoder layer it belongs to (None for embeddings)


@dataclass(frozen=True)
class ArchSpec:
    """What weightedit needs to know about one model family.

    Args:
        model_type: ``config.model_type`` of the family.
        writers: the residual-stream writer rules.
        embedding: regex of the input token embedding (the tensor shared with the LM head when tied).
        lm_head: name of the output embedding tensor written when untying.
        layers_path: attribute path from the ``*ForCausalLM`` module to its list of decoder blocks.
        norm_offset: constant added to stored RMSNorm weights to get the effective gain (Gemma: 1.0).
        post_norm: whether block outputs pass through a norm before joining the residual stream.
        aliases: further ``model_type`` values handled by the same spec.
    """

    model_type: str
    writers: tuple[WriterRule, ...]
    embedding: str
    lm_head: str = "lm_head.weight"
    layers_path: str = "model.layers"
    norm_offset: float = 0.0
    post_norm: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def match(self, name: str) -> WriterMatch | None:
        """The writer rule for ``name``, or ``None`` if the tensor does not write to the residual stream."""
        for rule in self.writers:
            m = rule.match(name)
            if m is not None:
                norm = rule.post_norm.format(**m.groupdict()) if rule.post_norm else None
                layer = m.groupdict().get("layer")
                return WriterMatch(name=name, rule=rule, norm_name=norm, layer=None if layer is None else int(layer))
        return None

    def is_embedding(self, name: str) -> bool:
        return re.fullmatch(self.embedding, name) is not None


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry under its ``model_type`` and aliases."""
    for key in (spec.model_type, *spec.aliases):
        if key in _REGISTRY:
            raise ValueError(f"architecture {key!r} is already registered")
        _REGISTRY[key] = spec
    return spec


def families() -> list[str]:
    """The primary ``model_type`` of every registered family, sorted."""
    return sorted({spec.model_type for spec in _REGISTRY.values()})


def get_spec(model_type: str) -> ArchSpec:
    """The registered spec for ``model_type``.

    Raises:
        UnsupportedArchitectureError: if the family is unknown; the message lists the supported ones.
    """
    try:
        return _REGISTRY[model_type]
    except KeyError:
        supported = ", ".join(sorted(_REGISTRY))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: weightedit knows {supported}; "
            "add an ArchSpec for it in src/weightedit/edit/arch.py (see README, 'Adding an architecture')"
        ) from None


def spec_for_config(config: Mapping[str, Any] | Any) -> ArchSpec:
    """The spec for a ``config.json`` dict or a ``PretrainedConfig``."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if not model_type:
        raise UnsupportedArchitectureError(
            "the model config has no 'model_type'; pass a transformers checkpoint folder with a config.json"
        )
    return get_spec(str(model_type))


# ----------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------


def _linear(path: str, group: str, post_norm: str | None = None) -> tuple[WriterRule, WriterRule]:
    """Weight and bias rules for an ``nn.Linear`` writer at ``layers.N.<path>``."""
    stem = _PREFIX + r"layers\." + _LAYER + r"\." + path
    return (
        WriterRule(stem + r"\.weight", axis=0, group=group, post_norm=post_norm),
        WriterRule(stem + r"\.bias", axis=0, group=group + "_bias", post_norm=post_norm),
    )


_EMBED = WriterRule(_PREFIX + r"embed_tokens\.weight", axis=-1, group="embedding")
_EMBED_NAME = r"(?:[\w.]+\.)?embed_tokens\.weight"
# transformers' in-memory layout of MoE experts: one stacked tensor [n_experts, d_model, d_ff].
_FUSED_EXPERTS = WriterRule(
    _PREFIX + r"layers\." + _LAYER + r"\.mlp\.experts\.down_proj", axis=-2, group="moe_expert_out"
)


def _dense(model_type: str, norm_offset: float = 0.0) -> ArchSpec:
    """Pre-norm decoder with ``self_attn.o_proj`` and ``mlp.down_proj`` (Llama and its descendants)."""
    return ArchSpec(
        model_type=model_type,
        writers=(_EMBED, *_linear(r"self_attn\.o_proj", "attn_out"), *_linear(r"mlp\.down_proj", "mlp_out")),
        embedding=_EMBED_NAME,
        norm_offset=norm_offset,
    )


for _family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
    register(_dense(_family))
# Gemma's RMSNorm scales by (1 + weight); its blocks are pre-norm, so the offset only matters for reports.
register(_dense("gemma", norm_offset=1.0))


def _post_norm(model_type: str, norm_offset: float) -> ArchSpec:
    """Gemma 2/3 and OLMo 2: attention and MLP outputs pass an RMSNorm before joining the residual."""
    attn_norm = "{prefix}layers.{layer}.post_attention_layernorm.weight"
    mlp_norm = "{prefix}layers.{layer}.post_feedforward_layernorm.weight"
    return ArchSpec(
        model_type=model_type,
        writers=(
            _EMBED,
            *_linear(r"self_attn\.o_proj", "attn_out", post_norm=attn_norm),
            *_linear(r"mlp\.down_proj", "mlp_out", post_norm=mlp_norm),
        ),
        embedding=_EMBED_NAME,
        norm_offset=norm_offset,
        post_norm=True,
    )


register(_post_norm("gemma2", norm_offset=1.0))
register(_post_norm("gemma3_text", norm_offset=1.0))
register(_post_norm("olmo2", norm_offset=0.0))

register(
    ArchSpec(
        model_type="gpt2",
        writers=(
            WriterRule(r"(?P<prefix>(?:[\w.]+\.)?)wte\.weight", axis=-1, group="embedding"),
            WriterRule(r"(?P<prefix>(?:[\w.]+\.)?)wpe\.weight", axis=-1, group="position_embedding"),
            # Conv1D stores [d_in, d_model]: the residual axis is the last one.
            WriterRule(_PREFIX + r"h\." + _LAYER + r"\.attn\.c_proj\.weight", axis=-1, group="attn_out"),
            WriterRule(_PREFIX + r"h\." + _LAYER + r"\.attn\.c_proj\.bias", axis=-1, group="attn_out_bias"),
            WriterRule(_PREFIX + r"h\." + _LAYER + r"\.mlp\.c_proj\.weight", axis=-1, group="mlp_out"),
            WriterRule(_PREFIX + r"h\." + _LAYER + r"\.mlp\.c_proj\.bias", axis=-1, group="mlp_out_bias"),
        ),
        embedding=r"(?:[\w.]+\.)?wte\.weight",
        layers_path="transformer.h",
    )
)

register(
    ArchSpec(
        model_type="mixtral",
        writers=(
            _EMBED,
            *_linear(r"self_attn\.o_proj", "attn_out"),
            *_linear(r"block_sparse_moe\.experts\.\d+\.w2", "moe_expert_out"),
            _FUSED_EXPERTS,
        ),
        embedding=_EMBED_NAME,
    )
)

for _family in ("qwen2_moe", "qwen3_moe"):
    register(
        ArchSpec(
            model_type=_family,
            writers=(
                _EMBED,
                *_linear(r"self_attn\.o_proj", "attn_out"),
                *_linear(r"mlp\.experts\.\d+\.down_proj", "moe_expert_out"),
                _FUSED_EXPERTS,
                *_linear(r"mlp\.shared_expert\.down_proj", "moe_shared_expert_out"),
                # Layers listed in `mlp_only_layers` keep a dense MLP.
                *_linear(r"mlp\.down_proj", "mlp_out"),
            ),
            embedding=_EMBED_NAME,
        )
    )
