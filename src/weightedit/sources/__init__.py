"""Model sources: what ``--model`` names (a folder, a ``.gguf`` file, a Hub id, ``recipe:NAME``) as a local
safetensors checkpoint folder.

:func:`resolve_model` dispatches to the local, GGUF, Hub and recipe readers, none of which imports it back.
"""

from ..io.cache import cache_dir
from ..io.hashing import cached_sha256
from .model import ModelSource, is_hub_id, public_name
from .resolve import card_front_matter, resolve_model

__all__ = [
    "ModelSource",
    "public_name",
    "is_hub_id",
    "resolve_model",
    "card_front_matter",
    # Re-exported for the modules that take everything about a model's source from here.
    "cache_dir",
    "cached_sha256",
]
