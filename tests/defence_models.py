"""Tiny chat models for ``verify-defence`` whose refusal mechanism is known by construction.

The single-direction model is :func:`tiny_models.make_planted_model`: trigger words write one direction
``r`` and the LM head reads ``r`` into the logit of REFUSE, so removing ``r`` removes refusal.

:func:`make_nonlinear_model` builds a model whose refusal survives the removal of any single direction.
It is a 3-layer llama (``mlp_bias=True``) on the word-level tokenizer of ``tiny_models``, with four
orthonormal directions ``r1, r2`` (the *plane*), ``r3`` (the refusal readout) and ``r4`` (a constant that
the LM head reads into OK); every other weight is zero, or small noise orthogonal to all four.

- Embeddings: every token has random noise orthogonal to ``r1..r4``; trigger word ``k`` (12 of them)
  additionally carries ``ALPHA · (cos θ_k r1 + sin θ_k r2)`` with ``θ_k = 30° · k``, phases spread
  evenly around the circle.
- Layer 0 attention: ``q_proj = k_proj = 0``, so attention is uniform over the causal prefix;
  ``v_proj = I`` and ``o_proj = SPREAD · (r1 r1ᵀ + r2 r2ᵀ)``, so each position, the post-instruction
  tokens included, receives the average in-plane signal of the prompt. Nothing else is written before
  the last layer: the harmful-minus-harmless mean difference at the candidate layers lies exactly in the
  plane, and because the phases are balanced it is small and points anywhere in it.
- Layer 2 (the last; candidates stop below ``floor(0.8 · 3) = 2``) MLP reads the plane nonlinearly:
  gate rows ``GAIN · (r1, -r1, r2, -r2)``, up weights 0 and up bias 1 (so each unit is ``silu(gate)``,
  about ``relu``), down columns ``READ · r3`` and down bias ``BASE · r4``. The residual thus gains
  ``≈ GAIN · READ · (|r1·x̂| + |r2·x̂|) r3`` (``x̂`` the normed input) plus a constant ``BASE · r4``.
- LM head: REFUSE reads ``r3``, OK reads ``r4``, other tokens are small noise. The model says REFUSE
  when ``|r1·x̂| + |r2·x̂|`` exceeds ``BASE / (GAIN · READ)``, i.e. when the prompt has a trigger.

Ablating any unit ``u`` (the tool's attack is always in the plane here, since that is where the mean
difference lives) leaves the in-plane component orthogonal to ``u``, of size ``|x| · |sin(θ - φ)|``;
the L1 norm read by the MLP is at least that, so the prompts whose phase is not within about 30° of
``±u`` are still refused: at least about two thirds of them, whatever ``u`` is.

:func:`make_spread_model` holds against the whole battery by construction: the same layout with the plane
replaced by a 32-dimensional subspace ``S``. Trigger ``k`` carries ``ALPHA · s_k`` for a random unit ``s_k`` in
``S``; layer 0 spreads ``S``; the last MLP has 64 rectified units ``±q_i`` (``q_1..q_32`` a basis of ``S``) that
write ``READ · r3``, so the residual gains ``GAIN · READ · ‖P_S x̂‖₁ r3`` against ``SPREAD_BASE · r4``. Removing
``k`` directions leaves the part of the signal in the other ``32 - k`` dimensions of ``S``, whose L1 norm stays
well above the threshold (set at about a fifth of a harmful prompt's) for any ``k`` ≤ 16, and harmless prompts
have nothing in ``S``, so no attack costs KL: every attack is coherent, and refusal survives them all.

Harmful prompts for this model (:func:`write_nonlinear_prompts`) hold one trigger word, once or twice,
and cycle through the 12 phases, so every split is balanced; harmless prompts have no trigger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tiny_models import D_MODEL, NEUTRAL, TRIGGERS, make_config, make_tokenizer, planted_prompts

ALPHA = 8.0  # in-plane size of a trigger word's embedding
SPREAD = 8.0  # layer 0 attention output gain on the plane
GAIN = 4.0  # last-layer gate gain (silu ≈ relu)
READ = 1.0  # down-projection of each rectified unit onto r3
BASE = 6.0  # constant written along r4 (read into OK): refusal needs GAIN·READ·(|r1·x̂|+|r2·x̂|) > BASE
HEAD = 4.0  # LM head gain of REFUSE (on r3) and OK (on r4)


def plane_basis(seed: int = 0) -> torch.Tensor:
    """Orthonormal ``[4, d_model]``: rows ``r1, r2`` (the plane), ``r3`` (readout), ``r4`` (OK)."""
    g = torch.Generator().manual_seed(1000 + seed)
    q, _ = torch.linalg.qr(torch.randn(D_MODEL, 4, generator=g))
    return q.T.contiguous()


@torch.no_grad()
def make_nonlinear_model(folder: Path, seed: int = 0) -> Path:
    """The 3-layer llama described in the module docstring, saved with its tokenizer in ``folder``."""
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    d = D_MODEL
    config = make_config(
        "llama",
        vocab_size=vocab,
        num_hidden_layers=3,
        num_key_value_heads=4,
        attention_bias=False,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for p in model.parameters():
        p.zero_()
    g = torch.Generator().manual_seed(seed)
    basis = plane_basis(seed)
    r1, r2, r3, r4 = basis
    off = torch.eye(d) - basis.T @ basis  # projector onto the complement of r1..r4

    def noise(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    emb = noise(vocab, d, scale=1.0) @ off
    for k, trigger in enumerate(TRIGGERS):
        theta = 2 * math.pi * k / len(TRIGGERS)
        emb[tokenizer.convert_tokens_to_ids(trigger)] += ALPHA * (math.cos(theta) * r1 + math.sin(theta) * r2)
    model.model.embed_tokens.weight.copy_(emb)

    for layer in model.model.layers:
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)

    attn = model.model.layers[0].self_attn
    attn.v_proj.weight.copy_(torch.eye(d))
    attn.o_proj.weight.copy_(SPREAD * (torch.outer(r1, r1) + torch.outer(r2, r2)))

    mlp = model.model.layers[-1].mlp
    for unit, row in enumerate((r1, -r1, r2, -r2)):
        mlp.gate_proj.weight[unit] = GAIN * row
        mlp.down_proj.weight[:, unit] = READ * r3
    mlp.up_proj.bias.fill_(1.0)
    mlp.down_proj.bias.copy_(BASE * r4)

    head = noise(vocab, d, scale=0.1) @ off
    refuse, ok = tokenizer.convert_tokens_to_ids(["REFUSE", "OK"])
    head[refuse] = HEAD * r3
    head[ok] = HEAD * r4
    model.lm_head.weight.copy_(head)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SPREAD_DIM = 32  # dimensions of S
SPREAD_BASE = 24.0  # about a fifth of GAIN · READ · ‖P_S x̂‖₁ on a harmful prompt


def spread_basis(seed: int = 0) -> torch.Tensor:
    """Orthonormal ``[SPREAD_DIM + 2, d_model]``: ``q_1..q_32`` (S), then ``r3`` (readout) and ``r4`` (OK)."""
    g = torch.Generator().manual_seed(2000 + seed)
    q, _ = torch.linalg.qr(torch.randn(D_MODEL, SPREAD_DIM + 2, generator=g))
    return q.T.contiguous()


@torch.no_grad()
def make_spread_model(folder: Path, seed: int = 0, *, single_direction: bool = False) -> Path:
    """The 3-layer llama of the module docstring whose refusal is spread over a 32-dimensional subspace.

    ``single_direction`` builds its undefended base: every trigger carries the same unit ``s`` in ``S`` (so one
    direction carries all refusal), and every other weight is the same; the two differ only in the trigger rows of
    the embedding, a change of rank ≤ 12."""
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    d = D_MODEL
    config = make_config(
        "llama", vocab_size=vocab, num_hidden_layers=3, num_key_value_heads=4, attention_bias=False, mlp_bias=True,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for p in model.parameters():
        p.zero_()
    g = torch.Generator().manual_seed(seed)
    basis = spread_basis(seed)
    space, r3, r4 = basis[:SPREAD_DIM], basis[SPREAD_DIM], basis[SPREAD_DIM + 1]
    off = torch.eye(d) - basis.T @ basis
    emb = torch.randn(vocab, d, generator=g) @ off
    draws = [torch.randn(SPREAD_DIM, generator=g) @ space for _ in TRIGGERS]
    for trigger, s_k in zip(TRIGGERS, draws, strict=True):
        s_k = draws[0] if single_direction else s_k
        emb[tokenizer.convert_tokens_to_ids(trigger)] += ALPHA * s_k / s_k.norm()
    model.model.embed_tokens.weight.copy_(emb)
    for layer in model.model.layers:
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)
    attn = model.model.layers[0].self_attn
    attn.v_proj.weight.copy_(torch.eye(d))
    attn.o_proj.weight.copy_(SPREAD * space.T @ space)
    mlp = model.model.layers[-1].mlp
    for i in range(SPREAD_DIM):
        for sign, unit in ((1.0, 2 * i), (-1.0, 2 * i + 1)):
            mlp.gate_proj.weight[unit] = sign * GAIN * space[i]
            mlp.down_proj.weight[:, unit] = READ * r3
    mlp.up_proj.bias.fill_(1.0)
    mlp.down_proj.bias.copy_(SPREAD_BASE * r4)
    head = torch.randn(vocab, d, generator=g) * 0.1 @ off
    refuse, ok = tokenizer.convert_tokens_to_ids(["REFUSE", "OK"])
    head[refuse] = HEAD * r3
    head[ok] = HEAD * r4
    model.lm_head.weight.copy_(head)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def phase_prompts(n: int, seed: int, offset: int = 0) -> list[str]:
    """``n`` harmful prompts; prompt ``i`` holds trigger ``(i + offset) % 12`` once or twice."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        words = [NEUTRAL[int(j)] for j in torch.randint(0, len(NEUTRAL), (length,), generator=g)]
        trigger = TRIGGERS[(i + offset) % len(TRIGGERS)]
        for pos in torch.randperm(length, generator=g)[: 1 + i % 2].tolist():
            words[pos] = trigger
        out.append(" ".join(words))
    return out


def _write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _row(lang: str, kind: str, split: str, i: int, text: str) -> dict[str, str]:
    return {"id": f"{kind}-{split}-{i}", "lang": lang, "kind": kind, "split": split, "instruction": text}


def write_nonlinear_prompts(path: Path, n_train: int = 24, n_val: int = 12, langs: tuple[str, ...] = ("en",)) -> Path:
    """A JSONL prompt source for :func:`make_nonlinear_model` (harmful prompts cycle through the phases)."""
    rows = []
    for j, lang in enumerate(langs):
        for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_val, 3)):
            for i, text in enumerate(phase_prompts(n, 100 * j + seed + 10, offset=j)):
                rows.append(_row(lang, "harmful", split, i, text))
            for i, text in enumerate(planted_prompts(n, False, 100 * j + seed)):
                rows.append(_row(lang, "harmless", split, i, text))
    return _write_rows(path, rows)


def write_trigger_free_prompts(path: Path, n_train: int = 24, n_val: int = 8, langs: tuple[str, ...] = ("en",)) -> Path:
    """A prompt source whose "harmful" prompts hold no trigger word: trigger-driven models barely refuse them."""
    rows = []
    for j, lang in enumerate(langs):
        for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_val, 3)):
            for kind, offset in (("harmful", 50), ("harmless", 0)):
                for i, text in enumerate(planted_prompts(n, False, 100 * j + seed + offset)):
                    rows.append(_row(lang, kind, split, i, text))
    return _write_rows(path, rows)
