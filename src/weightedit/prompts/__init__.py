"""Built-in multilingual prompt sets and loaders for user prompt files.

The built-in sets (``prompts/data/{harmful,harmless}/<lang>.jsonl``) were written for weightedit: 160
harmful and 160 harmless instructions per language, parallel across the 14 languages (the same meaning at
the same id), with a fixed split (``train``: ids 000–095, ``val``: 096–127, ``test``: 128–159). See the README
section "Built-in prompts" for how they were written and checked.

Every prompt source is used in three disjoint *roles* (:func:`role_prompts`): ``fit`` (mean differences and
refusal tokens), ``select`` (choosing the layer and position, and attacking in ``verify-defence``) and
``judge`` (every measurement a user reads). No prompt used to choose or attack is used to judge.

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
    "Role",
    "ROLES",
    "RolePrompts",
    "role_prompts",
    "prompt_roles",
]

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]

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


def parse_languages(
    value: str | list[str] | tuple[str, ...], *, available: tuple[str, ...] = LANGUAGES, option: str = "langs"
) -> list[str]:
    """``"all"`` / ``"en,zh"`` / a list -> validated language codes (``option`` names the option they were given in).

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
            f"{', '.join(available)} (or 'all')",
            option=option,
            value=value,
        )
    return list(dict.fromkeys(codes))


def _builtin_root():
    return resources.files("weightedit.prompts") / "data"


def builtin_prompts(kind: Kind, lang: str, split: Split | None = None) -> list[Prompt]:
    """The built-in ``kind`` prompts of ``lang`` (all, or one split)."""
    if kind not in ("harmful", "harmless"):
        raise PromptsError(f"prompt kind must be 'harmful' or 'harmless', got {kind!r}", option="kind", value=kind)
    parse_languages([lang], option="lang")
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
            f"prompt source {path} does not exist: pass a JSONL/CSV file, a folder, or hf://datasets/ORG/NAME",
            path=path,
            option="prompts",
            value=source,
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
            + ": check its lang/kind/split columns or folder layout",
            path=path,
        )
    return prompts


Role = Literal["fit", "select", "judge"]
ROLES: tuple[Role, ...] = ("fit", "select", "judge")


@dataclass(frozen=True)
class RolePrompts:
    """The prompts of one role, and where in the source they came from (for reports)."""

    prompts: list[Prompt]
    role: Role
    split: str  # the source's split these came from ("test", "val", "train", or "all")
    part: str  # "" when the whole split; otherwise which part of it ("last 20%", "first 80%", ...)

    @property
    def description(self) -> str:
        return f"{self.split} split" + (f" ({self.part})" if self.part else "")

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


def _available_splits(source: str | Path | None, kind: Kind, lang: str) -> dict[str, list[Prompt]]:
    found: dict[str, list[Prompt]] = {}
    for split in ("train", "val", "test"):
        try:
            prompts = load_prompts(source, kind, lang, split)
        except PromptsError:
            continue
        if all(p.split == split for p in prompts):
            found[split] = prompts
    return found


def prompt_roles(source: str | Path | None, kind: Kind, lang: str) -> dict[Role, RolePrompts]:
    """The ``kind`` prompts of ``lang`` in each of the three roles, which never share a prompt (one read of the source).

    - A source with a ``test`` split (the built-in sets): fit = train, select = val (or the last 20% of train
      when there is no val split), judge = test.
    - A source with ``train`` and ``val`` only (PolyRefuse): fit = the first 80% of train, select = its last 20%,
      judge = val.
    - A source without splits: fit = the first 60%, select = the next 20%, judge = the last 20%, in file order.

    Raises:
        PromptsError: the source has no such prompts, or too few to split.
    """
    splits = _available_splits(source, kind, lang)

    def tail(prompts: list[Prompt], split: str) -> tuple[RolePrompts, RolePrompts]:
        if len(prompts) < 2:
            raise PromptsError(
                f"{source or 'the built-in set'} has {len(prompts)} {kind} {lang} prompts in its {split} split, too "
                "few to hold some out for selection: add prompts or a val split",
                option="prompts",
                value=source,
            )
        cut = len(prompts) - max(1, len(prompts) // 5)
        return (
            RolePrompts(prompts[:cut], "fit", split, "first 80%"),
            RolePrompts(prompts[cut:], "select", split, "last 20%"),
        )

    if "test" in splits or ("train" in splits and "val" in splits):
        if "train" not in splits:
            raise PromptsError(
                f"{source or 'the built-in set'} has no train split of {kind} {lang} prompts: add one, or use a source "
                "without splits",
                option="prompts",
                value=source,
            )
        if "test" in splits:
            judge = RolePrompts(splits["test"], "judge", "test", "")
            if "val" in splits:
                fit, select = (
                    RolePrompts(splits["train"], "fit", "train", ""),
                    RolePrompts(splits["val"], "select", "val", ""),
                )
            else:
                fit, select = tail(splits["train"], "train")
        else:
            judge = RolePrompts(splits["val"], "judge", "val", "")
            fit, select = tail(splits["train"], "train")
    else:
        everything = load_prompts(source, kind, lang)
        if len(everything) < 3:
            raise PromptsError(
                f"{source} has {len(everything)} {kind} {lang} prompts, too few to split into fit/select/judge parts: "
                "add prompts",
                option="prompts",
                value=source,
            )
        a = (len(everything) * 3) // 5
        b = a + max(1, len(everything) // 5)
        fit = RolePrompts(everything[:a], "fit", "all", "first 60%")
        select = RolePrompts(everything[a:b], "select", "all", "next 20%")
        judge = RolePrompts(everything[b:], "judge", "all", "last 20%")
    return {"fit": fit, "select": select, "judge": judge}


def role_prompts(source: str | Path | None, kind: Kind, lang: str, role: Role) -> RolePrompts:
    """The ``kind`` prompts of ``lang`` that play ``role`` (see :func:`prompt_roles` for how a source is split).

    Raises:
        PromptsError: an unknown role, or the source has no such prompts or too few to split.
    """
    if role not in ROLES:
        raise PromptsError(f"prompt role must be one of {', '.join(ROLES)}, got {role!r}", option="role", value=role)
    return prompt_roles(source, kind, lang)[role]


def _download_dataset(repo_id: str) -> Path:
    # huggingface_hub's download functions load here, not at import: only hf:// sources need them, and every
    # command imports this module to check --langs (about 0.3 s).
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.jsonl", "*.csv", "*.json", "*/*.jsonl"])
        )
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise PromptsError(
            f"cannot download dataset {repo_id} from the Hub: {str(e).splitlines()[0]}",
            option="prompts",
            value=f"hf://datasets/{repo_id}",
        ) from None


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
    raise PromptsError(f"prompt file {path} must be .jsonl or .csv", path=path)


def _row_to_prompt(row: dict, *, path: Path, where: str, index: int, kind: str | None, lang: str | None) -> Prompt:
    text = next((row[c] for c in _TEXT_COLUMNS if isinstance(row.get(c), str)), None)
    if text is None:
        raise PromptsError(f"{where}: no instruction column (expected one of {', '.join(_TEXT_COLUMNS)})", path=path)
    text = text.strip()
    if not text:
        raise PromptsError(f"{where}: empty instruction", path=path)
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
        raise PromptsError(f"cannot read prompt file {path}: {e}", path=path) from None
    if path.suffix.lower() == ".json" and lines and lines[0].lstrip().startswith("["):
        try:
            rows = json.loads("\n".join(lines))
        except ValueError as e:
            raise PromptsError(f"{path}: invalid JSON ({e})", path=path) from None
        return [
            _row_to_prompt(r, path=path, where=f"{path} item {i}", index=i, kind=kind, lang=lang)
            for i, r in enumerate(rows)
        ]
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PromptsError(
                f"{path} line {number}: invalid JSON ({e.args[0] if e.args else e})", path=path
            ) from None
        if not isinstance(row, dict):
            raise PromptsError(f"{path} line {number}: expected a JSON object with an 'instruction' field", path=path)
        out.append(
            _row_to_prompt(row, path=path, where=f"{path} line {number}", index=number - 1, kind=kind, lang=lang)
        )
    return out


def _read_csv(path: Path, *, kind: str | None, lang: str | None) -> list[Prompt]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not any(c in reader.fieldnames for c in _TEXT_COLUMNS):
                raise PromptsError(
                    f"{path} line 1: the CSV header needs an instruction column (one of {', '.join(_TEXT_COLUMNS)})",
                    path=path,
                )
            return [
                _row_to_prompt(row, path=path, where=f"{path} line {i + 2}", index=i, kind=kind, lang=lang)
                for i, row in enumerate(reader)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PromptsError(f"cannot read prompt file {path}: {e}", path=path) from None
