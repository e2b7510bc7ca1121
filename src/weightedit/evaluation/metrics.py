"""Capability metrics that need the model: perplexity on plain text, and greedy generation."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from .._progress import progress_bar
from ..runtime.activations import _cache_keyword, _output_cache, _prefix_cache, after_prefix
from ..runtime.modeling import Batch, LoadedModel, batches

__all__ = [
    "token_nll",
    "token_nll_per_text",
    "perplexity",
    "generate",
    "generate_ids",
    "decode",
    "stop_token_ids",
    "extract_number",
    "parse_number",
    "numbers_match",
    "MGSM_SUFFIX",
]


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
    nll, counts = token_nll_per_text(loaded, texts, batch_size=batch_size, progress=progress, description=description)
    return math.fsum(nll), sum(counts)


@torch.inference_mode()
def token_nll_per_text(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
    description: str = "perplexity",
) -> tuple[list[float], list[int]]:
    """Per text: summed negative log-likelihood (nats) and number of predicted tokens (see :func:`token_nll`)."""
    tok = loaded.tokenizer
    per_nll = [0.0] * len(texts)
    per_count = [0] * len(texts)
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
            sums = (nll.double() * valid).sum(dim=1)
            for j, i in enumerate(order[start : start + batch_size]):
                per_nll[i] = float(sums[j])
                per_count[i] = int(valid[j].sum())
            bar.advance(len(chunk))
    return per_nll, per_count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    """The tokens that end a completion: the generation config's EOS ids (what ``model.generate`` stops on),
    else the tokenizer's EOS token."""
    config = getattr(loaded.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def generate(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 24,
    progress: bool = False,
    description: str = "generating",
) -> list[str]:
    """Greedy completions of formatted prompts, decoded (see :func:`generate_ids`)."""
    ids = generate_ids(
        loaded, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, description=description
    )
    return decode(loaded, ids)


def decode(loaded: LoadedModel, ids: Sequence[Sequence[int]]) -> list[str]:
    """The text of each row of new token ids, as :func:`generate` returns it (special tokens dropped, stripped)."""
    return [loaded.tokenizer.decode(list(row), skip_special_tokens=True).strip() for row in ids]


@torch.inference_mode()
def generate_ids(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 24,
    progress: bool = False,
    description: str = "generating",
) -> list[list[int]]:
    """New token ids of the greedy completion of each formatted prompt, ending with its first EOS token or
    after ``max_new_tokens``.

    Prompts are sorted by length and batched with left padding; the token prefix all prompts share (the
    chat template's system prompt and header) is run once and its keys and values reused by every batch
    (where the model allows it, see ``LoadedModel.prefix_caching``); a row that reaches EOS leaves the
    batch, so the remaining steps cost only the rows still writing. The tokens are those of
    ``model.generate(do_sample=False)`` on the same prompts (tested in every registered family).
    """
    out: list[list[int]] = [[] for _ in texts]
    stop = torch.tensor(sorted(stop_token_ids(loaded)), dtype=torch.long, device=loaded.device)
    keyword = _cache_keyword(loaded.model)
    prefix_cache = None
    with progress_bar(description, len(texts), enabled=progress) as bar:
        for batch in batches(loaded, texts, batch_size, split_prefix=loaded.prefix_caching):
            if prefix_cache is None:
                prefix_cache = _prefix_cache(loaded, batch.prefix)
            rows = _greedy(loaded, batch, prefix_cache, stop, max_new_tokens, keyword)
            for i, ids in zip(batch.index, rows, strict=True):
                out[i] = ids
            bar.advance(len(batch.index))
    return out


def _greedy(
    loaded: LoadedModel, batch: Batch, prefix_cache: Any, stop: torch.Tensor, max_new_tokens: int, keyword: str
) -> list[list[int]]:
    """New token ids of each row of ``batch`` (greedy), finished rows dropped from the cache as they end."""
    n = batch.input_ids.shape[0]
    cache, mask, positions = after_prefix(batch, prefix_cache)
    new: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return new
    alive = torch.arange(n, device=mask.device)
    ids = batch.input_ids
    for step in range(max_new_tokens):
        model_out = loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **({keyword: cache} if cache is not None else {}),
        )
        cache = _output_cache(model_out)
        next_ids = model_out.logits[:, -1].argmax(-1)
        for row, token in zip(alive.tolist(), next_ids.tolist(), strict=True):
            new[row].append(token)
        if step == max_new_tokens - 1:
            break
        running = ~torch.isin(next_ids, stop)
        if not bool(running.all()):
            if not bool(running.any()):
                break
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, mask, positions, next_ids = alive[keep], mask[keep], positions[keep], next_ids[keep]
        ids = next_ids[:, None]
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], 1)
        positions = positions[:, -1:] + 1
    return new


# MGSM: the instruction appended to each question, and the word that introduces the answer, per language.
MGSM_SUFFIX: dict[str, tuple[str, str]] = {
    "ar": ('فكّر خطوة بخطوة، ثم اكتب الإجابة النهائية في السطر الأخير بالشكل "الإجابة: <رقم>".', "الإجابة"),
    "de": (
        "Denke Schritt für Schritt nach und gib die endgültige Antwort in der letzten Zeile als „Antwort: <Zahl>“ an.",
        "antwort",
    ),
    "en": ('Think step by step, then give the final answer on the last line as "Answer: <number>".', "answer"),
    "es": ("Piensa paso a paso y da la respuesta final en la última línea como «Respuesta: <número>».", "respuesta"),
    "fr": (
        "Réfléchis étape par étape, puis donne la réponse finale sur la dernière ligne sous la forme « Réponse : <nombre> ».",
        "réponse",
    ),
    "it": (
        'Ragiona passo dopo passo e scrivi la risposta finale nell\'ultima riga come "Risposta: <numero>".',
        "risposta",
    ),
    "ja": ("段階的に考え、最後の行に「答え: <数値>」の形で最終的な答えを書いてください。", "答え"),
    "ko": ('단계별로 생각한 다음 마지막 줄에 "답: <숫자>" 형식으로 최종 답을 쓰세요.', "답"),
    "nl": ('Denk stap voor stap na en geef het eindantwoord op de laatste regel als "Antwoord: <getal>".', "antwoord"),
    "pl": (
        "Myśl krok po kroku i podaj ostateczną odpowiedź w ostatniej linii jako „Odpowiedź: <liczba>”.",
        "odpowiedź",
    ),
    "ru": ("Рассуждай шаг за шагом и запиши окончательный ответ в последней строке в виде «Ответ: <число>».", "ответ"),
    "th": ('คิดทีละขั้นตอน แล้วเขียนคำตอบสุดท้ายในบรรทัดสุดท้ายในรูปแบบ "คำตอบ: <ตัวเลข>"', "คำตอบ"),
    "yo": ('Ronú ní ìgbésẹ̀ kọ̀ọ̀kan, lẹ́yìn náà kọ ìdáhùn ìkẹyìn sí ìlà tó kẹ́yìn bí "Ìdáhùn: <nọ́mbà>".', "ìdáhùn"),
    "zh": ("请一步一步地思考，并在最后一行以“答案：<数字>”的格式给出最终答案。", "答案"),
}
# Languages that write decimals with a comma ("3,5") and group thousands with a dot or a space ("1.200").
DECIMAL_COMMA = frozenset({"de", "es", "fr", "it", "nl", "pl", "ru"})
# Languages that group thousands with a plain space ("1 200"); no-break spaces group in every language.
SPACE_GROUPING = frozenset({"fr", "pl", "ru"})
_DIGITS = str.maketrans("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹０１２３４５６７８９", "0123456789" * 3)
_THIN = "\u00a0\u202f\u2009"
_NUMBER_PLAIN = re.compile(rf"[-−]?\d(?:[\d.,'{_THIN}٫٬]*\d)?")
_NUMBER_SPACED = re.compile(rf"[-−]?\d{{1,3}}(?:[ {_THIN}]\d{{3}})+(?:[.,]\d+)?(?!\d)|[-−]?\d(?:[\d.,'{_THIN}٫٬]*\d)?")


def parse_number(token: str, lang: str = "en") -> float | None:
    """One number as written in ``lang``: "1.200" is 1200 and "3,5" is 3.5 in German; "1,200" is 1200 in English.

    Rules: Arabic-Indic and full-width digits count; ``٫`` is a decimal and ``٬`` a group separator; spaces
    and apostrophes group thousands. With both "." and "," the later one is the decimal separator. With one
    kind repeated it groups thousands. A single "," is a decimal comma in comma languages and groups thousands
    elsewhere when exactly three digits follow; a single "." followed by exactly three digits groups thousands
    in comma languages and is a decimal point otherwise.
    """
    t = token.translate(_DIGITS).replace("−", "-").replace("٫", "\x00").replace("٬", "")
    for ch in f" '{_THIN}":
        t = t.replace(ch, "")
    sign = -1.0 if t.startswith("-") else 1.0
    t = t.lstrip("-")
    if "\x00" in t:
        t = t.replace(",", "").replace(".", "").replace("\x00", ".")
    elif "." in t and "," in t:
        dec = "." if t.rfind(".") > t.rfind(",") else ","
        t = t.replace("," if dec == "." else ".", "").replace(dec, ".")
    elif t.count(",") > 1 or t.count(".") > 1:
        t = t.replace(",", "").replace(".", "")
    elif "," in t:
        three = re.fullmatch(r"\d{1,3},\d{3}", t) is not None
        t = t.replace(",", ".") if lang in DECIMAL_COMMA or not three else t.replace(",", "")
    elif "." in t and lang in DECIMAL_COMMA and re.fullmatch(r"\d{1,3}\.\d{3}", t):
        t = t.replace(".", "")
    try:
        return sign * float(t)
    except ValueError:
        return None


def extract_number(text: str, lang: str = "en") -> float | None:
    """The answer of an MGSM completion: the first number after the last answer word of ``lang`` (or
    English "answer"), else the last number in the text; parsed with :func:`parse_number`."""
    from .judges import strip_thinking

    text = strip_thinking(text)
    pattern = _NUMBER_SPACED if lang in SPACE_GROUPING else _NUMBER_PLAIN
    lowered = text.casefold()
    words = {MGSM_SUFFIX.get(lang, ("", "answer"))[1].casefold(), "answer"}
    start = max((lowered.rfind(w) for w in words), default=-1)
    if start >= 0:
        found = pattern.findall(text[start:].split("\n")[0]) or pattern.findall(text[start:])
        if found:
            return parse_number(found[0], lang)
    found = pattern.findall(text)
    return parse_number(found[-1], lang) if found else None


def numbers_match(predicted: float | None, gold: float, *, rel: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Numeric equality with tolerance (``math.isclose``): 12.0 matches 12 and 0.1 + 0.2 matches 0.3."""
    return predicted is not None and math.isclose(predicted, gold, rel_tol=rel, abs_tol=abs_tol)
