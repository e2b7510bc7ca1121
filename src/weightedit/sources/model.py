"""A model resolved to a local checkpoint folder, and how models are named in files that may be published."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

__all__ = ["ModelSource", "public_name", "is_hub_id"]

# One part of a Hub repo id (the namespace or the name): 1 to 96 letters, digits, "_", "-" or ".", starting and
# ending with a letter, digit or "_" (the rule huggingface_hub checks before any request).
_HUB_PART = r"\w(?:[\w.-]{0,94}\w)?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` can name a Hub repo: ``name`` or ``namespace/name`` (``gpt2``, ``Qwen/Qwen2.5-7B``).

    The parts may not contain ``--`` or ``..`` and the id may not end with ``.git``.
    """
    return _HUB_ID.fullmatch(text) is not None and "--" not in text and ".." not in text and not text.endswith(".git")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local checkpoint folder.

    Attributes:
        folder: local folder with ``config.json`` and safetensors weights.
        given: what the user passed.
        kind: ``"local"``, ``"hub"``, ``"gguf"`` or ``"recipe"``.
        revision: the Hub commit (for Hub models), else ``None``.
        inputs: the user's own files (which must never be written to).
        details: extra provenance (GGUF hash, recipe name, ...).
    """

    folder: Path
    given: str
    kind: str
    revision: str | None = None
    inputs: tuple[Path, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def public_name(self) -> str:
        """The model's name for files that may be published (no local absolute path)."""
        return public_name(self.given)

    def provenance(self) -> dict[str, Any]:
        return {"model": self.public_name, "kind": self.kind, "revision": self.revision, **self.details}


@overload
def public_name(given: str | os.PathLike[str]) -> str: ...
@overload
def public_name(given: None) -> None: ...
def public_name(given: str | os.PathLike[str] | None) -> str | None:
    """What to record for a model (or file) in files that may be published.

    Hub ids and ``recipe:NAME`` stay as given; a local path is recorded as ``./<last component>``, so that no
    absolute local path (a user name, a home folder) ends up in ``weightedit.json``, reports or plot titles,
    and so that it is never mistaken for a Hub id.
    """
    if given is None:
        return None
    text = str(given)
    if text.startswith("recipe:") or "://" in text or not text:
        return text
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or not is_hub_id(text):
        name = path.resolve().name
        return f"./{name}" if name else text
    return text
