"""Measuring a model (and its baseline) in every language.

Cheap forward-pass metrics come first and always run: the first-token refusal score on harmful and
harmless prompts, KL divergence to the baseline's next-token distribution, and perplexity on parallel
sentences. Greedy generation, judged per language, is an optional, expensive layer on top
(``generate=N`` prompts per language). Baseline measurements are cached on disk, keyed by the model's
content hash, the prompts and the options, so evaluating several edits of one model costs one baseline.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch

from ..errors import EvaluationError, OptionsError, PromptsError
from ..prompts import LANGUAGES, Kind, Split, load_prompts, role_prompts
from ..runtime.activations import last_logprobs
from ..runtime.modeling import LoadedModel, load_model
from ..runtime.options import ModelLoadOptions
from ..runtime.scoring import RefusalTokens, derive_refusal_tokens, kl_divergence, mean_probs, refusal_scores
from ..sources import ModelSource, cache_dir, cached_sha256, resolve_model
from .judges import judge_with_marks, make_judge
from .metrics import MGSM_SUFFIX, extract_number, generate, numbers_match, perplexity, token_nll_per_text

__all__ = ["EvalOptions", "LanguageRun", "ModelRun", "measure_model", "model_fingerprint", "EvalData", "load_eval_data"]

CACHE_VERSION = (
    4  # 2: per-sentence NLL for bootstrap intervals; 3: refusal tokens from fit prompts, judge-role prompts;
)
# 4: one scoring pass per language, EOS-stopped generations


@dataclass(frozen=True)
class EvalOptions:
    langs: tuple[str, ...] = LANGUAGES
    prompts: str | None = None  # prompt source (None = built-in)
    # "auto": the judge role of the prompt source (built-in: the test split), disjoint from every prompt
    # direction selection or a defence attack uses; or a split name (train/val/test) to force one.
    split: str = "auto"
    limit: int = 32  # harmful and harmless prompts per language
    # Prompts per language to complete greedily and judge; the judged share is the headline refusal rate.
    # None = every evaluated prompt (``limit``); 0 = none (first-token scores only, for quick looks).
    generate: int | None = None
    generate_harmless: int | None = None
    # Long enough for refusals that open with a preamble; each completion stops at the model's EOS.
    max_new_tokens: int = 96
    judge: str = "substring"
    batch_size: int = 16
    gen_batch_size: int = 24
    ppl_source: str | None = None  # folder of <lang>.jsonl with a "text" field (FLORES/SIB); None = built-in
    ppl_limit: int = 100  # FLORES/SIB sentences per language (the built-in set has 32)
    xstest: str | None = None  # JSONL with "instruction" and "label" (safe/unsafe)
    xstest_limit: int = 32
    mgsm: str | None = None  # folder of <lang>.jsonl with "question" and "answer"
    mgsm_limit: int = 0  # questions per language (0 = skip MGSM)
    mgsm_max_new_tokens: int = 256
    dtype: str = "auto"
    device_map: str | None = None
    chat_template: str | None = None  # Jinja file for a tokenizer without a chat template
    seed: int = 0
    trust_remote_code: bool = False  # allow the model repo's own modeling code (how it loads, not what is measured)

    # The fields a measured language depends on, which make its cache key; every other field changes only how
    # the measurement runs or what is done after it (languages are cached one by one, judging reads the cached
    # generations). A test checks that each field is in exactly one of the two lists.
    MEASURED: ClassVar[tuple[str, ...]] = (
        "prompts",
        "split",
        "limit",
        "generate",
        "generate_harmless",
        "max_new_tokens",
        "ppl_source",
        "ppl_limit",
        "xstest",
        "xstest_limit",
        "mgsm",
        "mgsm_limit",
        "mgsm_max_new_tokens",
        "dtype",
        "chat_template",
        "seed",
    )
    NOT_MEASURED: ClassVar[tuple[str, ...]] = (
        "langs",
        "judge",
        "batch_size",
        "gen_batch_size",
        "device_map",
        "trust_remote_code",
    )

    def __post_init__(self) -> None:
        if self.split not in ("auto", "train", "val", "test"):
            raise EvaluationError(
                f"unknown <<split>> {self.split!r}: use auto, train, val or test", option="split", value=self.split
            )
        for name in ("limit", "max_new_tokens", "batch_size", "gen_batch_size", "ppl_limit", "mgsm_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise OptionsError(name, getattr(self, name), "must be at least 1")
        for name in ("generate", "generate_harmless", "xstest_limit", "mgsm_limit"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise OptionsError(name, value, "must be 0 (none) or more")
        make_judge(self.judge)  # an unknown judge is an EvaluationError naming the choices
        ModelLoadOptions(dtype=self.dtype)  # an unknown dtype is an OptionsError

    @property
    def n_generate(self) -> int:
        """Harmful prompts per language that are completed and judged."""
        return self.limit if self.generate is None else min(self.generate, self.limit)

    @property
    def n_generate_harmless(self) -> int:
        """Harmless prompts per language that are completed and judged."""
        return self.limit if self.generate_harmless is None else min(self.generate_harmless, self.limit)

    @property
    def load(self) -> ModelLoadOptions:
        """How the models are loaded to run."""
        return ModelLoadOptions(
            dtype=self.dtype,
            device_map=self.device_map,
            chat_template=self.chat_template,
            trust_remote_code=self.trust_remote_code,
        )

    def key(self) -> dict[str, Any]:
        """The options that change what is measured (not how fast): :attr:`MEASURED`."""
        d = {name: getattr(self, name) for name in self.MEASURED}
        d["generate"], d["generate_harmless"] = self.n_generate, self.n_generate_harmless
        if self.chat_template:  # the template's text, not its path, changes what is measured
            d["chat_template"] = hashlib.sha256(Path(self.chat_template).read_bytes()).hexdigest()[:16]
        return d


@dataclass
class EvalData:
    """The texts evaluated for one language."""

    lang: str
    harmful: list[str]
    harmless: list[str]
    ppl: list[str]
    xstest: list[str] = field(default_factory=list)
    mgsm: list[tuple[str, float]] = field(default_factory=list)
    split: str = ""  # where the judged prompts come from ("test split", ...)
    token_harmful: list[str] = field(default_factory=list)  # fit prompts the refusal tokens are derived from
    token_harmless: list[str] = field(default_factory=list)

    def digest(self) -> str:
        payload = json.dumps(
            [
                self.lang,
                self.harmful,
                self.harmless,
                self.ppl,
                self.xstest,
                self.mgsm,
                self.token_harmful,
                self.token_harmless,
            ],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise PromptsError(f"cannot read {path}: {e}", path=path) from None


def _eval_prompts(options: EvalOptions, kind: Kind, lang: str) -> tuple[list[str], str]:
    """The prompts to judge on, and a description of where they come from."""
    if options.split == "auto":
        chosen = role_prompts(options.prompts, kind, lang, "judge")
        return chosen.texts[: options.limit], chosen.description
    if options.split not in ("train", "val", "test"):
        raise EvaluationError(
            f"unknown <<split>> {options.split!r}: use auto, train, val or test", option="split", value=options.split
        )
    texts = [p.text for p in load_prompts(options.prompts, kind, lang, cast(Split, options.split))]
    return texts[: options.limit], f"{options.split} split (chosen by the user)"


def load_eval_data(lang: str, options: EvalOptions) -> EvalData:
    harmful, split = _eval_prompts(options, "harmful", lang)
    harmless, _ = _eval_prompts(options, "harmless", lang)
    if not harmful or not harmless:
        raise EvaluationError(
            f"empty prompt source for {lang}: no harmful or harmless prompts in split {options.split!r}",
            option="prompts",
            value=options.prompts,
        )
    # Refusal tokens come from the fit (training) prompts, never from the prompts they score.
    token_harmful = role_prompts(options.prompts, "harmful", lang, "fit").texts[: options.limit]
    token_harmless = role_prompts(options.prompts, "harmless", lang, "fit").texts[: options.limit]
    if options.ppl_source:
        path = Path(options.ppl_source) / f"{lang}.jsonl"
        if not path.exists():
            raise EvaluationError(
                f"{options.ppl_source} has no {lang}.jsonl for perplexity: pass a folder with one file per language",
                path=path,
                option="ppl_source",
                value=options.ppl_source,
            )
        ppl = [str(r["text"]) for r in _read_jsonl(path) if r.get("text")][: options.ppl_limit]
    else:
        # The built-in harmless prompts are parallel sentences in every language.
        ppl = role_prompts(None, "harmless", lang, "judge").texts[: options.ppl_limit]
    xstest: list[str] = []
    if options.xstest and lang == "en":
        rows = _read_jsonl(Path(options.xstest))
        xstest = [str(r.get("instruction") or r.get("prompt")) for r in rows if str(r.get("label", "safe")) == "safe"][
            : options.xstest_limit
        ]
    mgsm: list[tuple[str, float]] = []
    if options.mgsm and options.mgsm_limit:
        path = Path(options.mgsm) / f"{lang}.jsonl"
        if path.exists():
            mgsm = [(str(r["question"]), float(r["answer"])) for r in _read_jsonl(path)][: options.mgsm_limit]
    return EvalData(lang, harmful, harmless, ppl, xstest, mgsm, split, token_harmful, token_harmless)


def model_fingerprint(source: ModelSource) -> str:
    """Content hash of a checkpoint: its config and the SHA-256 of every weight file (cached by stat)."""
    folder = Path(source.folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        h.update(shard.name.encode())
        h.update(cached_sha256(shard).encode())
    return h.hexdigest()[:20]


@dataclass
class LanguageRun:
    """What was measured for one model in one language (all plain Python/tensors, cacheable)."""

    lang: str
    tokens: RefusalTokens
    harmful_scores: list[float]
    harmless_scores: list[float]
    nll: float
    nll_tokens: int
    harmful_generations: list[str] = field(default_factory=list)
    harmless_generations: list[str] = field(default_factory=list)
    harmful_gen_scores: list[float] = field(default_factory=list)
    xstest_scores: list[float] = field(default_factory=list)
    xstest_generations: list[str] = field(default_factory=list)
    mgsm_correct: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # vs the baseline (edited model only)
    nll_per_text: list[float] = field(default_factory=list)  # per perplexity sentence (bootstrap intervals)
    tokens_per_text: list[int] = field(default_factory=list)
    harmless_logprobs: torch.Tensor | None = None  # baseline only: for the edited model's KL

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.nll_tokens)


@dataclass
class ModelRun:
    model: str
    fingerprint: str
    folder: str
    langs: dict[str, LanguageRun]
    seconds: dict[str, float]
    cached: list[str] = field(default_factory=list)


def _cache_path(fingerprint: str, data: EvalData, options: EvalOptions, tokens: RefusalTokens | None) -> Path:
    key = json.dumps(
        {
            "v": CACHE_VERSION,
            "model": fingerprint,
            "data": data.digest(),
            "options": options.key(),
            "tokens": list(tokens.ids) if tokens else None,
        },
        sort_keys=True,
    )
    return cache_dir() / "eval" / hashlib.sha256(key.encode()).hexdigest()[:24] / f"{data.lang}.pt"


def measure_model(
    model: str | ModelSource,
    options: EvalOptions,
    *,
    reference: dict[str, LanguageRun] | None = None,
    keep_logprobs: bool = False,
    use_cache: bool = True,
    progress: bool = True,
    label: str = "model",
    intervention: Callable[[Any], contextlib.AbstractContextManager[Any]] | None = None,
) -> ModelRun:
    """Measure ``model`` in every language of ``options``.

    Args:
        reference: the baseline's per-language runs; when given, refusal tokens come from the baseline
            (so both models are scored on the same tokens) and KL is measured against it.
        keep_logprobs: keep the harmless next-token distributions (needed when this is the baseline).
        intervention: run every measurement inside ``intervention(model)`` (run-time hooks, such as
            ``runtime.hooks.ablate``); the cache, keyed by the model's content, is then not used.
    """
    if intervention is not None:
        use_cache = False
    source = model if isinstance(model, ModelSource) else resolve_model(model, progress=progress)
    fingerprint = model_fingerprint(source)
    datas = [load_eval_data(lang, options) for lang in options.langs]
    runs: dict[str, LanguageRun] = {}
    cached: list[str] = []
    pending: list[EvalData] = []
    for data in datas:
        tokens = reference[data.lang].tokens if reference else None
        path = _cache_path(fingerprint, data, options, tokens)
        if use_cache and path.exists():
            try:
                runs[data.lang] = _load_run(path)
                cached.append(data.lang)
                continue
            except (OSError, RuntimeError, KeyError, TypeError, EOFError):
                path.unlink(missing_ok=True)
        pending.append(data)
    seconds: dict[str, float] = {"load": 0.0, "forward": 0.0, "perplexity": 0.0, "generate": 0.0}
    if pending:
        t = time.perf_counter()
        loaded = load_model(source, options.load, progress=progress)
        seconds["load"] = time.perf_counter() - t
        try:
            measured: list[tuple[EvalData, LanguageRun]] = []
            with intervention(loaded.model) if intervention is not None else contextlib.nullcontext():
                for data in pending:
                    ref = reference[data.lang] if reference else None
                    measured.append(
                        (data, _measure_language(loaded, data, options, ref, seconds, progress=progress, label=label))
                    )
                t = time.perf_counter()
                _generate_all(loaded, measured, options, progress=progress, label=label)
                seconds["generate"] += time.perf_counter() - t
            for data, run in measured:
                ref = reference[data.lang] if reference else None
                path = _cache_path(fingerprint, data, options, ref.tokens if ref else None)
                _save_run(run, path, keep_logprobs=True)
                if not keep_logprobs:
                    run.harmless_logprobs = None
                runs[data.lang] = run
        finally:
            del loaded
            gc.collect()
    if not keep_logprobs:
        for run in runs.values():
            run.harmless_logprobs = None
    return ModelRun(
        model=source.given,
        fingerprint=fingerprint,
        folder=str(source.folder),
        langs={lang: runs[lang] for lang in options.langs},
        seconds=seconds,
        cached=cached,
    )


def _measure_language(
    loaded: LoadedModel,
    data: EvalData,
    options: EvalOptions,
    reference: LanguageRun | None,
    seconds: dict[str, float],
    *,
    progress: bool,
    label: str,
) -> LanguageRun:
    lang = data.lang
    t = time.perf_counter()
    # One pass over every prompt of the language (harmful, harmless, the fit prompts the refusal tokens come
    # from, XSTest): fuller batches than one call per kind, and the shared prefix computed once.
    parts: dict[str, list[str]] = {"harmful": data.harmful, "harmless": data.harmless}
    if reference is None:
        parts["fit_harmful"] = data.token_harmful or data.harmful
        parts["fit_harmless"] = data.token_harmless or data.harmless
    if data.xstest:
        parts["xstest"] = data.xstest
    texts = [text for kind in parts.values() for text in loaded.format(kind)]
    lp_all = last_logprobs(
        loaded, texts, batch_size=options.batch_size, progress=progress, description=f"{label} {lang}: scoring"
    )
    lp: dict[str, torch.Tensor] = {}
    start = 0
    for name, kind in parts.items():
        lp[name] = lp_all[start : start + len(kind)]
        start += len(kind)
    if reference is None:
        tokens = derive_refusal_tokens(mean_probs(lp["fit_harmful"]), mean_probs(lp["fit_harmless"]), loaded.tokenizer)
    else:
        tokens = reference.tokens
    lp_b = lp["harmless"].clone()  # kept (for KL) without holding on to the whole pass
    run = LanguageRun(
        lang=lang,
        tokens=tokens,
        harmful_scores=refusal_scores(lp["harmful"], tokens.ids).tolist(),
        harmless_scores=refusal_scores(lp_b, tokens.ids).tolist(),
        nll=0.0,
        nll_tokens=0,
        harmless_logprobs=lp_b,
    )
    if reference is not None and reference.harmless_logprobs is not None:
        run.kl = kl_divergence(reference.harmless_logprobs, lp_b).tolist()
    if "xstest" in lp:
        run.xstest_scores = refusal_scores(lp["xstest"], tokens.ids).tolist()
    del lp, lp_all
    seconds["forward"] += time.perf_counter() - t

    t = time.perf_counter()
    run.nll_per_text, run.tokens_per_text = token_nll_per_text(
        loaded,
        data.ppl,
        batch_size=max(1, options.batch_size // 2),
        progress=progress,
        description=f"{label} {lang}: perplexity",
    )
    run.nll, run.nll_tokens = math.fsum(run.nll_per_text), sum(run.tokens_per_text)
    seconds["perplexity"] += time.perf_counter() - t

    return run


def _generate_all(
    loaded: LoadedModel,
    measured: list[tuple[EvalData, LanguageRun]],
    options: EvalOptions,
    *,
    progress: bool,
    label: str,
) -> None:
    """Every greedy completion the options ask for, for all languages in one pass per length limit.

    Pooling the languages lets batches be filled with prompts of similar length whatever their language,
    and the chat template's shared prefix is computed once for all of them.
    """
    jobs: dict[int, list[tuple[LanguageRun, str, str]]] = {}  # max_new_tokens -> (run, field, formatted text)
    for data, run in measured:
        lang = data.lang
        for text in loaded.format(data.harmful[: options.n_generate]):
            jobs.setdefault(options.max_new_tokens, []).append((run, "harmful_generations", text))
        run.harmful_gen_scores = run.harmful_scores[: options.n_generate]
        for text in loaded.format(data.harmless[: options.n_generate_harmless]):
            jobs.setdefault(options.max_new_tokens, []).append((run, "harmless_generations", text))
        if data.xstest and options.n_generate:
            for text in loaded.format(data.xstest[: options.n_generate]):
                jobs.setdefault(options.max_new_tokens, []).append((run, "xstest_generations", text))
        if data.mgsm:
            suffix = MGSM_SUFFIX.get(lang, MGSM_SUFFIX["en"])[0]
            for text in loaded.format([f"{q}\n{suffix}" for q, _ in data.mgsm]):
                jobs.setdefault(options.mgsm_max_new_tokens, []).append((run, "_mgsm", text))
    langs = ", ".join(data.lang for data, _ in measured)
    for max_new_tokens, rows in sorted(jobs.items()):
        completions = generate(
            loaded,
            [text for _, _, text in rows],
            max_new_tokens=max_new_tokens,
            batch_size=options.gen_batch_size,
            progress=progress,
            description=f"{label}: generating ≤{max_new_tokens} tokens ({langs})",
        )
        mgsm: dict[str, list[str]] = {}
        for (run, name, _), completion in zip(rows, completions, strict=True):
            if name == "_mgsm":
                mgsm.setdefault(run.lang, []).append(completion)
            else:
                getattr(run, name).append(completion)
        for data, run in measured:
            if data.lang in mgsm:
                run.mgsm_correct = [
                    numbers_match(extract_number(c, data.lang), a)
                    for c, (_, a) in zip(mgsm[data.lang], data.mgsm, strict=True)
                ]


def judge_runs(run: LanguageRun, judge_spec: str) -> dict[str, list[bool]]:
    """Judge a run's generations (harmful, harmless, XSTest): refusal or not.

    With the ``score`` judge, a generated prompt counts as refused when its first-token score is positive. With
    the substring judge, ``harmful_hedged`` also marks the harmful generations that are refusals only by a hedged
    decline (``SubstringJudge.judge_marked``), from the same pass; the other judges do not tell, and leave it out.
    """
    if judge_spec == "score":
        return {
            "harmful": [s > 0 for s in run.harmful_scores[: len(run.harmful_generations)]],
            "harmless": [s > 0 for s in run.harmless_scores[: len(run.harmless_generations)]],
            "xstest": [s > 0 for s in run.xstest_scores[: len(run.xstest_generations)]],
        }
    judge = make_judge(judge_spec)
    assert judge is not None
    out: dict[str, list[bool]] = {}
    texts = run.harmful_generations
    out["harmful"], hedged = judge_with_marks(judge, texts, [run.lang] * len(texts))
    if hedged is not None:
        out["harmful_hedged"] = hedged
    for name, texts, lang in (
        ("harmless", run.harmless_generations, run.lang),
        ("xstest", run.xstest_generations, "en"),
    ):
        out[name] = judge.judge(texts, [lang] * len(texts)) if texts else []
    return out


def _save_run(run: LanguageRun, path: Path, *, keep_logprobs: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in run.__dict__.items() if k not in ("tokens", "harmless_logprobs")}
    payload["tokens"] = run.tokens.to_dict()
    if keep_logprobs and run.harmless_logprobs is not None:
        payload["harmless_logprobs"] = run.harmless_logprobs
    from ..io.atomic import atomic_file

    with atomic_file(path, record=False) as tmp:
        torch.save(payload, tmp)


def _load_run(path: Path) -> LanguageRun:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["tokens"] = RefusalTokens.from_dict(payload["tokens"])
    payload.setdefault("harmless_logprobs", None)
    return LanguageRun(**payload)
