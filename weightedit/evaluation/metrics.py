"""Capability metrics that need the model: perplexity on plain text, and greedy generation."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from .._progress import progress_bar
from ..modeling import LoadedModel

__all__ = ["token_nll", "perplexity", "generate", "extract_number"]


@torch.inference_mode()
def token_nll(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
    description: str = "perplexity",
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``texts`` as plain text, and the number of predicted tokens.

    Each text is scored on its own (BOS added if the tokenizer adds one), right after its first token.
    """
    tok = loaded.tokenizer
    total, count = 0.0, 0
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    with progress_bar(description, len(texts), enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=512)
            ids = enc.input_ids.to(loaded.device)
            mask = enc.attention_mask.to(loaded.device)
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = ids[:, 1:]
            nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            total += float(nll[valid].double().sum())
            count += int(valid.sum())
            bar.advance(len(chunk))
    return total, count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 24,
    progress: bool = False,
    description: str = "generating",
) -> list[str]:
    """Greedy completions of formatted prompts (batched, left padding)."""
    from ..modeling import batches

    out: list[str] = [""] * len(texts)
    tok = loaded.tokenizer
    with progress_bar(description, len(texts), enabled=progress) as bar:
        for batch in batches(loaded, texts, batch_size):
            generated = loaded.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
            new = generated[:, batch.input_ids.shape[1] :]
            for i, row in zip(batch.index, new, strict=True):
                out[i] = tok.decode(row, skip_special_tokens=True).strip()
            bar.advance(len(batch.index))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """The last number in a completion (MGSM answers), commas removed."""
    found = _NUMBER.findall(text.replace("\u00a0", " "))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None
