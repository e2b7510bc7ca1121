"""Built-in multilingual prompt sets and loaders for user prompt files.

The built-in sets (``prompts/data/{harmful,harmless}/<lang>.jsonl``) were written for weightedit: 160
harmful and 160 harmless instructions per language, parallel across the 14 languages (the same meaning at
the same id), with a fixed split (``train``: ids 000–127, ``val``: 128–159). See the README section
"Built-in prompts" for how they were written and checked.

User prompts load from:

- a JSONL or CSV file: one instruction per row in a column named ``instruction`` (or ``prompt``/``text``),
  optionally ``lang``, ``kind`` (harmful/harmless; ``label`` also accepted) and ``split`` columns;
- a folder in the PolyRefuse layout ``<lang>/<kind>_<split>.jsonl`` or the built-in layout
  ``<kind>/<lang>.jsonl``;
- a Hub dataset, ``hf://datasets/<org>/<name>`` (downloaded with ``huggingface_hub.snapshot_download``,
  then read as a folder).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from ..errors import PromptsError

__all__ = [
    "LANGUAGES",
    "LANGUAGE_NAMES",
    "Prompt",
    "builtin_prompts",
    "load_prompts",
    "parse_languages",
    "Kind",
    "Split",
]

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val"]

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "ru": "Russian",
    "th": "Thai",
    "yo": "Yoruba",
    "zh": "Chinese",
}
LANGUAGES: tuple[str, ...] = tuple(sorted(LANGUAGE_NAMES))
_TEXT_COLUMNS = ("instruction", "prompt", "text", "question")
_KIND_ALIASES = {"harmful": "harmful", "harmless": "harmless", "unsafe": "harmful", "safe": "harmless"}


@dataclass(frozen=True)
class Prompt:
    """One instruction."""

    id: str
    text: str
    lang: str
    kind: str
    split: str | None = None
    category: str | None = None


def parse_languages(value: str | list[str] | tuple[str, ...], *, available: tuple[str, ...] = LANGUAGES) -> list[str]:
    """``"all"`` / ``"en,zh"`` / a list -> validated language codes.

    Raises:
        PromptsError: an unknown code; the message lists the available ones.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    codes = [c.strip().lower() for c in items if c.strip()]
    if codes == ["all"]:
        return list(available)
    unknown = [c for c in codes if c not in available]
    if unknown or not codes:
        raise PromptsError(
            f"no prompts for language {', '.join(unknown) or '(none given)'}: available languages are "
            f"{', '.join(available)} (or 'all')"
        )
    return list(dict.fromkeys(codes))


def _builtin_root():
    return resources.files("weightedit.prompts") / "data"


def builtin_prompts(kind: Kind, lang: str, split: Split | None = None) -> list[Prompt]:
    """The built-in ``kind`` prompts of ``lang`` (all, or one split)."""
    if kind not in ("harmful", "harmless"):
        raise PromptsError(f"prompt kind must be 'harmful' or 'harmless', got {kind!r}")
    parse_languages([lang])
    path = _builtin_root() / kind / f"{lang}.jsonl"
    prompts = _read_jsonl(Path(str(path)), kind=kind, lang=lang)
    return [p for p in prompts if split is None or p.split == split]


def load_prompts(source: str | Path | None, kind: Kind, lang: str, split: Split | None = None) -> list[Prompt]:
    """Prompts of one kind and language from ``source`` (``None``/``"builtin"``, a path, or ``hf://datasets/...``).

    Raises:
        PromptsError: the source is missing, malformed (with the line number), or has no matching rows.
    """
    if source is None or str(source) == "builtin":
        return builtin_prompts(kind, lang, split)
    text = str(source)
    if text.startswith("hf://datasets/"):
        path = _download_dataset(text[len("hf://datasets/") :])
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise PromptsError(
            f"prompt source {path} does not exist: pass a JSONL/CSV file, a folder, or hf://datasets/ORG/NAME"
        )
    if path.is_dir():
        prompts = _read_folder(path, kind=kind, lang=lang, split=split)
    else:
        prompts = _read_file(path, kind=None, lang=None)
        prompts = [p for p in prompts if p.lang in (lang, "") and p.kind in (kind, "")]
        prompts = [Prompt(p.id, p.text, lang, kind, p.split, p.category) for p in prompts]
        if split is not None and any(p.split for p in prompts):
            prompts = [p for p in prompts if p.split == split]
    if not prompts:
        raise PromptsError(
            f"{path} has no {kind} prompts for language {lang!r}"
            + (f" in split {split!r}" if split else "")
            + ": check its lang/kind/split columns or folder layout"
        )
    return prompts


def _download_dataset(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.jsonl", "*.csv", "*.json", "*/*.jsonl"])
        )
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise PromptsError(f"cannot download dataset {repo_id} from the Hub: {str(e).splitlines()[0]}") from None


def _read_folder(folder: Path, *, kind: str, lang: str, split: str | None) -> list[Prompt]:
    # PolyRefuse layout: <lang>/<kind>_<split>.jsonl
    sub = folder / lang
    if sub.is_dir():
        splits = [split] if split else ["train", "val", "test"]
        out: list[Prompt] = []
        for s in splits:
            for ext in (".jsonl", ".csv"):
                f = sub / f"{kind}_{s}{ext}"
                if f.exists():
                    out += [
                        Prompt(p.id, p.text, lang, kind, s, p.category) for p in _read_file(f, kind=kind, lang=lang)
                    ]
        return out
    # Built-in layout: <kind>/<lang>.jsonl
    f = folder / kind / f"{lang}.jsonl"
    if f.exists():
        prompts = _read_jsonl(f, kind=kind, lang=lang)
        return [p for p in prompts if split is None or p.split == split]
    # Flat layout: <kind>_<lang>.jsonl or <kind>.jsonl with a lang column.
    for name in (f"{kind}_{lang}.jsonl", f"{kind}.jsonl", f"{kind}_{lang}.csv", f"{kind}.csv"):
        f = folder / name
        if f.exists():
            prompts = [p for p in _read_file(f, kind=kind, lang=None) if p.lang in (lang, "")]
            prompts = [Prompt(p.id, p.text, lang, kind, p.split, p.category) for p in prompts]
            return [p for p in prompts if split is None or not p.split or p.split == split]
    return []


def _read_file(path: Path, *, kind: str | None, lang: str | None) -> list[Prompt]:
    if path.suffix.lower() == ".csv":
        return _read_csv(path, kind=kind, lang=lang)
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path, kind=kind, lang=lang)
    raise PromptsError(f"prompt file {path} must be .jsonl or .csv")


def _row_to_prompt(row: dict, *, where: str, index: int, kind: str | None, lang: str | None) -> Prompt:
    text = next((row[c] for c in _TEXT_COLUMNS if isinstance(row.get(c), str)), None)
    if text is None:
        raise PromptsError(f"{where}: no instruction column (expected one of {', '.join(_TEXT_COLUMNS)})")
    text = text.strip()
    if not text:
        raise PromptsError(f"{where}: empty instruction")
    row_kind = row.get("kind") or row.get("label") or kind or ""
    row_kind = _KIND_ALIASES.get(str(row_kind).lower(), str(row_kind).lower())
    return Prompt(
        id=str(row.get("id", index)),
        text=text,
        lang=str(row.get("lang") or lang or ""),
        kind=row_kind,
        split=row.get("split"),
        category=row.get("category"),
    )


def _read_jsonl(path: Path, *, kind: str | None, lang: str | None) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsError(f"cannot read prompt file {path}: {e}") from None
    if path.suffix.lower() == ".json" and lines and lines[0].lstrip().startswith("["):
        try:
            rows = json.loads("\n".join(lines))
        except ValueError as e:
            raise PromptsError(f"{path}: invalid JSON ({e})") from None
        return [_row_to_prompt(r, where=f"{path} item {i}", index=i, kind=kind, lang=lang) for i, r in enumerate(rows)]
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PromptsError(f"{path} line {number}: invalid JSON ({e.args[0] if e.args else e})") from None
        if not isinstance(row, dict):
            raise PromptsError(f"{path} line {number}: expected a JSON object with an 'instruction' field")
        out.append(_row_to_prompt(row, where=f"{path} line {number}", index=number - 1, kind=kind, lang=lang))
    return out


def _read_csv(path: Path, *, kind: str | None, lang: str | None) -> list[Prompt]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not any(c in reader.fieldnames for c in _TEXT_COLUMNS):
                raise PromptsError(
                    f"{path} line 1: the CSV header needs an instruction column (one of {', '.join(_TEXT_COLUMNS)})"
                )
            return [
                _row_to_prompt(row, where=f"{path} line {i + 2}", index=i, kind=kind, lang=lang)
                for i, row in enumerate(reader)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PromptsError(f"cannot read prompt file {path}: {e}") from None
