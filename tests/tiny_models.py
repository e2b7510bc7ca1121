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


# --------------------------------------------------------------------------------------------------------
# A tiny chat model whose refusal is controlled by a known direction
# --------------------------------------------------------------------------------------------------------

SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>", "REFUSE", "OK"]
TRIGGERS = [f"bad{i}" for i in range(12)]
NEUTRAL = [f"word{i}" for i in range(60)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# A template with a long shared header, like a default system prompt.
PREFIX_TEMPLATE = (
    "<s> <|user|> word1 word2 word3 word4 word5 <|end|> "
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(template: str = CHAT_TEMPLATE):
    """A word-level tokenizer over SPECIAL + TRIGGERS + NEUTRAL words, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + TRIGGERS + NEUTRAL)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|end|>", "<|assistant|>"],
    )
    fast.chat_template = template
    return fast


def planted_prompts(n: int, harmful: bool, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        words = [NEUTRAL[int(i)] for i in torch.randint(0, len(NEUTRAL), (length,), generator=g)]
        if harmful:
            for _ in range(2):
                pos = int(torch.randint(0, length, (1,), generator=g))
                words[pos] = TRIGGERS[int(torch.randint(0, len(TRIGGERS), (1,), generator=g))]
        out.append(" ".join(words))
    return out


@torch.no_grad()
def make_planted_model(folder: Path, r_true: torch.Tensor, seed: int = 0) -> Path:
    """A 3-layer llama in which trigger words write ``r_true`` and ``r_true`` makes the model say REFUSE.

    Trigger-word embeddings carry ``+4 r_true``; layer 0's attention spreads the ``r_true`` component of
    the prompt to every later position (including the post-instruction tokens); the LM head reads
    ``r_true`` into the logit of REFUSE. Everything else is random noise orthogonal to ``r_true``, so the
    mean difference between harmful and harmless prompts at layers 1 and 2 lies along ``r_true``.
    """
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    d = D_MODEL
    config = make_config(
        "llama",
        vocab_size=vocab,
        num_hidden_layers=3,
        num_key_value_heads=4,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    r = r_true / r_true.norm()
    proj = torch.eye(d) - torch.outer(r, r)

    def noise(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    emb = noise(vocab, d, scale=1.0) @ proj
    ids = tokenizer.convert_tokens_to_ids(TRIGGERS)
    emb[ids] += 4.0 * r
    model.model.embed_tokens.weight.copy_(emb)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight.copy_(noise(*lin.weight.shape, scale=0.3 / d**0.5))
        # Values copy the residual; the output keeps its r_true part (plus small noise off r_true).
        attn.v_proj.weight.copy_(torch.eye(d))
        out = (3.0 if i == 0 else 0.5) * torch.outer(r, r) + proj @ noise(d, d, scale=0.05 / d**0.5)
        attn.o_proj.weight.copy_(out)
        mlp.down_proj.weight.copy_(proj @ noise(d, mlp.down_proj.weight.shape[1], scale=0.1 / d**0.5))
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)
    head = noise(vocab, d, scale=0.3) @ proj
    refuse, ok = tokenizer.convert_tokens_to_ids(["REFUSE", "OK"])
    head[refuse] = 12.0 * r
    head[ok] = -6.0 * r
    head[ok] += 2.0 * (noise(d, scale=1.0) @ proj) / d**0.5
    model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_planted_prompts(path: Path, n_train: int = 24, n_val: int = 8, langs: tuple[str, ...] = ("en",)) -> Path:
    """A JSONL prompt file for the planted model (each "language" draws different random sentences), with
    train, val and test splits like the built-in sets."""
    import json

    rows = []
    for j, lang in enumerate(langs):
        for kind, harmful in (("harmful", True), ("harmless", False)):
            for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_val, 3)):
                for i, text in enumerate(planted_prompts(n, harmful, 100 * j + seed + (10 if harmful else 0))):
                    row = {"id": f"{kind}-{split}-{i}", "lang": lang, "kind": kind, "split": split, "instruction": text}
                    rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
