"""weightedit's greedy generation loop (shared prefix run once, finished rows dropped) writes the tokens that
``model.generate(do_sample=False)`` writes, in every registered family."""

from __future__ import annotations

import pytest

from weightedit.evaluation.metrics import generate, generate_ids, stop_token_ids
from weightedit.runtime.modeling import batches, load_model

from tiny_models import FAMILY_CONFIGS, PREFIX_TEMPLATE, TIED, make_model, make_tokenizer, planted_prompts

TEMPLATE = PREFIX_TEMPLATE


def _reference(loaded, texts, max_new_tokens, eos):
    """transformers' own greedy generation, one left-padded batch, truncated after the first EOS (``eos``: an
    id, a list of ids or None)."""
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out, raw = [], []
    for batch in batches(loaded, texts, len(texts)):
        generated = loaded.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        new = generated[:, batch.input_ids.shape[1] :].tolist()
        rows, kept = {}, {}
        for i, ids in zip(batch.index, new, strict=True):
            ends = [j for j, t in enumerate(ids) if t in stops]
            if ends:
                ids = ids[: ends[0] + 1]
            rows[i] = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
            kept[i] = ids
        out = [rows[i] for i in range(len(texts))]
        raw = [kept[i] for i in range(len(texts))]
    return out, raw


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_generation_matches_transformers_generate(family, tmp_path):
    tokenizer = make_tokenizer(TEMPLATE)
    extra = {"vocab_size": len(tokenizer)}
    if family in TIED:
        extra["tie_word_embeddings"] = True
    model = make_model(family, **extra)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, progress=False)
    texts = loaded.format(planted_prompts(5, True, 3) + planted_prompts(4, False, 4))
    n_new = 12

    # Without an EOS every row runs to the limit; then make a token that some rows write mid-way the EOS, so
    # that rows finish at different steps and leave the batch.
    loaded.model.generation_config.eos_token_id = None
    loaded.tokenizer.eos_token = None
    assert stop_token_ids(loaded) == set()
    free, tokens = _reference(loaded, texts, n_new, None)
    assert generate_ids(loaded, texts, max_new_tokens=n_new, batch_size=4) == tokens
    assert generate(loaded, texts, max_new_tokens=n_new, batch_size=4) == free
    assert all(len(ids) == n_new for ids in tokens)
    counts: dict[int, int] = {}
    for ids in tokens:
        for t in set(ids[1:-1]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=lambda t: (0 < counts[t] < len(texts), counts[t]))
    loaded.model.generation_config.eos_token_id = eos
    assert stop_token_ids(loaded) == {eos}
    stopped, stopped_ids = _reference(loaded, texts, n_new, eos)
    assert stopped_ids != tokens  # some rows did stop early
    for caching in (False, True) if loaded.prefix_caching else (False,):
        loaded.prefix_caching = caching
        for batch_size in (3, len(texts)):
            assert generate_ids(loaded, texts, max_new_tokens=n_new, batch_size=batch_size) == stopped_ids
    assert generate(loaded, texts, max_new_tokens=n_new, batch_size=3) == stopped


def test_generation_stops_on_every_eos_id_and_handles_zero_tokens(tmp_path):
    tokenizer = make_tokenizer(TEMPLATE)
    model = make_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, progress=False)
    texts = loaded.format(planted_prompts(3, True, 5))
    loaded.model.generation_config.eos_token_id = None
    _, free = _reference(loaded, texts, 8, None)
    firsts = sorted({ids[0] for ids in free})
    stops = [firsts[0], firsts[-1]] if len(firsts) > 1 else [firsts[0], firsts[0] + 1]
    loaded.model.generation_config.eos_token_id = stops
    assert stop_token_ids(loaded) == set(stops)
    assert generate(loaded, texts, max_new_tokens=0) == ["", "", ""]
    assert generate_ids(loaded, texts, max_new_tokens=8) == _reference(loaded, texts, 8, stops)[1]
