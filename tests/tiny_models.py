"""Tiny random models of every registry family, built from their config classes.

Weights are drawn large enough that activations are O(1) (the default init of std 0.02 would make every
logit nearly equal and hide mistakes), norm gains and biases are random and non-trivial, and the
checkpoint is saved in several shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

D_MODEL = 64
VOCAB = 128

_COMMON: dict[str, Any] = dict(
    hidden_size=D_MODEL,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "gemma": {},
    "gemma2": dict(sliding_window=16),
    "gemma3_text": dict(sliding_window=16),
    "olmo2": {},
    "gpt2": dict(n_embd=D_MODEL, n_layer=2, n_head=4, n_positions=128),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}

POST_NORM = {"gemma2", "gemma3_text", "olmo2"}
TIED = {"gemma", "gemma2", "gemma3_text", "gpt2"}


def make_config(family: str, **overrides: Any):
    kwargs = {**_COMMON, **FAMILY_CONFIGS[family], **overrides}
    if family == "gpt2":
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k
            not in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
            )
        }
    return AutoConfig.for_model(family, **kwargs)


@torch.no_grad()
def make_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``family`` with O(1) activations and random norm gains and biases."""
    torch.manual_seed(seed)
    config = make_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma_style = family in ("gemma", "gemma2", "gemma3_text")
    for name, p in model.named_parameters():
        if "norm" in name or name.split(".")[-2].startswith("ln"):
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                # Gemma stores (gain - 1); everyone else stores the gain.
                p.normal_(0.0 if gemma_style else 1.0, 0.3)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
        elif p.dim() >= 2:
            fan_in = p.shape[-1] if "wte" not in name and "wpe" not in name and "embed" not in name else 1
            p.normal_(0.0, 1.0 / max(fan_in, 1) ** 0.5)
    model.eval()
    return model


def save_model(model: PreTrainedModel, folder: Path, *, shards: bool = True) -> Path:
    """``save_pretrained`` into ``folder`` (several shards unless ``shards=False``)."""
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "10GB")
    return folder


def random_direction(d: int = D_MODEL, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g)
    return r / r.norm()


def input_ids(batch: int = 2, length: int = 12, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
