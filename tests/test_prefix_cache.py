"""Computing the shared prompt prefix once gives the same numbers as running every prompt in full."""

from __future__ import annotations

import pytest
import torch

from weightedit.runtime.activations import capture_means, last_logprobs
from weightedit.runtime.hooks import ablate, add
from weightedit.runtime.modeling import load_model

from tiny_models import (
    FAMILY_CONFIGS,
    PREFIX_TEMPLATE,
    TIED,
    make_model,
    make_tokenizer,
    planted_prompts,
    random_direction,
)

TEMPLATE = PREFIX_TEMPLATE


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_prefix_cache_matches_full_prompts(family, tmp_path):
    tokenizer = make_tokenizer(TEMPLATE)
    extra = {"vocab_size": len(tokenizer)}
    if family in TIED:
        extra["tie_word_embeddings"] = True
    model = make_model(family, **extra)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, progress=False)
    if family in ("gemma2", "gemma3_text"):
        # The tiny configs use a 16-token sliding window, shorter than these prompts: padding after a cached
        # prefix would shift the window, so prefix caching must be off for them.
        assert loaded.prefix_caching is False
        return
    assert loaded.prefix_caching is True
    texts = loaded.format(planted_prompts(7, True, 3) + planted_prompts(6, False, 4))
    r = random_direction()

    def run(prefix: bool):
        loaded.prefix_caching = prefix
        plain = last_logprobs(loaded, texts, batch_size=4)
        ablated = last_logprobs(loaded, texts, batch_size=5, intervention=lambda: ablate(loaded.model, r))
        added = last_logprobs(loaded, texts, batch_size=3, intervention=lambda: add(loaded.model, 2 * r, layer=1))
        means = capture_means(loaded, texts, batch_size=4).means
        return plain, ablated, added, means

    full = run(False)
    cached = run(True)
    for a, b in zip(full, cached, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=2e-4), (a - b).abs().max()
