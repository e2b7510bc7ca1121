"""The choices an edit takes, as values the command line and the library share."""

from __future__ import annotations

from enum import Enum

from ..errors import enum_option

__all__ = ["TiedEmbeddings", "tied_embeddings_option"]


class TiedEmbeddings(str, Enum):
    """For a model whose LM head shares the input embedding matrix.

    ``untie`` (default) keeps the original matrix as ``lm_head.weight``, so the edit is exact; ``edit-both``
    edits the shared matrix and keeps the checkpoint tied (smaller, not exact).
    """

    UNTIE = "untie"
    EDIT_BOTH = "edit-both"


def tied_embeddings_option(value: TiedEmbeddings | str) -> TiedEmbeddings:
    """``value`` as a :class:`TiedEmbeddings`.

    Raises:
        OptionsError: it is neither ``untie`` nor ``edit-both``.
    """
    return enum_option("tied_embeddings", value, TiedEmbeddings)
