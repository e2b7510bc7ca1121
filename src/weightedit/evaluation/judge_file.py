"""``weightedit judge``: judge the responses of a JSONL file, per language, with intervals.

Input rows have ``lang`` and ``response`` (and optionally ``prompt``); output rows are the input rows plus
``"refused": true|false`` (and, with the substring judge, ``"hedge"``: the refusal is a hedged decline). A row
that already carries a boolean ``refused`` (a labelled set, such as the calibration set) keeps it as
``refused_input``, and the summary then also reports the judge's accuracy, precision and recall against those
labels.

The output is written to a temporary file next to ``--out`` and renamed into place, so ``--out`` is either
complete or untouched (also on Ctrl-C).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvaluationError, OutputExistsError, PromptsError, UnsafeOutputError
from ..io.atomic import TMP_MARKER, disk_full_error
from ..prompts import LANGUAGES, load_prompts
from .judges import Judge, _scores, judge_with_marks, make_judge, strip_thinking
from .stats import wilson_interval

__all__ = ["JudgedFile", "read_rows", "judge_file", "score_judge"]


@dataclass
class JudgedFile:
    """What ``judge_file`` did: the output path, the rows, and the per-language summary."""

    out: Path
    judge: str
    rows: list[dict[str, Any]]
    per_language: dict[str, dict[str, Any]] = field(default_factory=dict)
    labelled: bool = False

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "judge": self.judge, "labelled": self.labelled, "languages": self.per_language}


def read_rows(path: Path, *, need_prompt: bool = False) -> list[dict[str, Any]]:
    """Read and validate the input rows (one-line errors naming the file, line and fix)."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(
            f"<<input>> {path} does not exist: pass a JSONL file with lang and response fields",
            path=path,
            option="input",
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsError(f"cannot read {path} ({e}): pass a UTF-8 JSONL file", path=path) from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PromptsError(
                f"{path} line {number}: invalid JSON ({str(e).split(':')[0]}): fix or remove the line", path=path
            ) from None
        if not isinstance(row, dict):
            raise PromptsError(f"{path} line {number}: expected a JSON object with lang and response fields", path=path)
        for key in ("lang", "response", *(("prompt",) if need_prompt else ())):
            if key not in row:
                why = " (the score judge asks the model about the prompt)" if key == "prompt" else ""
                raise PromptsError(
                    f"{path} line {number}: missing field {key!r}{why}: every row needs lang and response", path=path
                )
            if not isinstance(row[key], str):
                raise PromptsError(
                    f"{path} line {number}: field {key!r} must be a string, got {type(row[key]).__name__}", path=path
                )
        if row["lang"] not in LANGUAGES:
            raise PromptsError(
                f"{path} line {number}: unknown language {row['lang']!r}: use one of {', '.join(LANGUAGES)}", path=path
            )
        rows.append(row)
    if not rows:
        raise PromptsError(f"{path} has no rows: each line must be a JSON object with lang and response", path=path)
    return rows


def _check_out(out: Path, input_path: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.resolve() == Path(input_path).resolve():
        raise UnsafeOutputError(
            f"<<out>> {out} is the <<input>> file: choose another output file (the input is never written)",
            path=out,
            option="out",
        )
    if out.is_dir():
        raise OutputExistsError(
            f"<<out>> {out} is a folder: pass a file name such as judged.jsonl", path=out, option="out"
        )
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"<<out>> {out} already exists: pass <<overwrite>> to replace it, or choose another file",
            path=out,
            option="out",
        )
    if not out.parent.exists():
        raise EvaluationError(
            f"the folder of <<out>> {out} does not exist: create {out.parent} or choose another path",
            path=out,
            option="out",
        )
    return out


def _write_atomic(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = out.parent / f".{out.name}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_full_error(e, out) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def score_judge(model: str, rows: Sequence[dict[str, Any]], *, prompts: str | None, progress: bool) -> list[bool]:
    """The ``score`` judge on rows: is the model's first-token refusal score after ``prompt`` positive?

    The refusal tokens of each language are derived from the model itself on the train split of
    ``prompts`` (default: the built-in prompts), as evaluation does. The response is not read.
    """
    # The modules that run a model load here, not at import: they bring torch and transformers, which the
    # substring and classifier judges do not need (importing this module takes 0.3 s instead of 2 s).
    from ..runtime.activations import last_logprobs
    from ..runtime.modeling import load_model
    from ..runtime.scoring import derive_refusal_tokens, mean_probs, refusal_scores

    loaded = load_model(model, progress=progress)
    verdicts: list[bool] = [False] * len(rows)
    for lang in sorted({r["lang"] for r in rows}):
        harmful = [p.text for p in load_prompts(prompts, "harmful", lang, "train")][:32]
        harmless = [p.text for p in load_prompts(prompts, "harmless", lang, "train")][:32]
        lp_h = last_logprobs(loaded, loaded.format(harmful), progress=False)
        lp_b = last_logprobs(loaded, loaded.format(harmless), progress=False)
        tokens = derive_refusal_tokens(mean_probs(lp_h), mean_probs(lp_b), loaded.tokenizer)
        index = [i for i, r in enumerate(rows) if r["lang"] == lang]
        lp = last_logprobs(loaded, loaded.format([rows[i]["prompt"] for i in index]), progress=False)
        for i, s in zip(index, refusal_scores(lp, tokens.ids).tolist(), strict=True):
            verdicts[i] = s > 0
    return verdicts


def judge_file(
    input_path: Path,
    out: Path,
    judge_spec: str = "substring",
    *,
    model: str | None = None,
    prompts: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> JudgedFile:
    """Judge every row of ``input_path`` and write ``out`` (atomically); see the module docstring."""
    judge: Judge | None = make_judge(judge_spec)
    if judge_spec == "score" and not model:
        raise EvaluationError(
            "<<judge>> score needs <<model>>: it asks that model whether it refuses each row's prompt",
            option="judge",
            value=judge_spec,
        )
    rows = read_rows(input_path, need_prompt=judge_spec == "score")
    out = _check_out(out, input_path, overwrite)
    texts, langs = [strip_thinking(r["response"]) for r in rows], [r["lang"] for r in rows]
    # The substring judge also marks the refusals that are hedged declines (counted as refusals; SubstringJudge.hedges).
    hedges: list[bool] | None = None
    if judge is None:
        assert model is not None
        verdicts = score_judge(model, rows, prompts=prompts, progress=progress)
    else:
        verdicts, hedges = judge_with_marks(judge, texts, langs)
    labelled = all(isinstance(r.get("refused"), bool) for r in rows)
    judged = []
    for i, (row, verdict) in enumerate(zip(rows, verdicts, strict=True)):
        new = dict(row)
        if "refused" in new:
            new["refused_input"] = new.pop("refused")
        new["refused"] = bool(verdict)
        if hedges is not None:
            new["hedge"] = hedges[i]
        judged.append(new)
    per_language: dict[str, dict[str, Any]] = {}
    for lang in [x for x in LANGUAGES if any(r["lang"] == x for r in rows)]:
        mine = [r for r in judged if r["lang"] == lang]
        k = sum(r["refused"] for r in mine)
        entry: dict[str, Any] = {
            "n": len(mine),
            "refused": k,
            "rate": k / len(mine),
            "ci": wilson_interval(k, len(mine)),
        }
        if hedges is not None:
            entry["hedged"] = sum(r["hedge"] for r in mine)
        if labelled:
            entry["agreement"] = _scores([r["refused_input"] for r in mine], [r["refused"] for r in mine])
        per_language[lang] = entry
    _write_atomic(out, judged)
    return JudgedFile(out=out, judge=judge_spec, rows=judged, per_language=per_language, labelled=labelled)
