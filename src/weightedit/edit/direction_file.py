"""The direction file: a refusal direction plus the facts needed to trust it.

Format (``docs/architecture.md``, "File formats"): a safetensors file with ``direction`` (``[d_model]`` float32), optionally
``candidates`` (``[n_layers, n_positions, d_model]``), and string metadata: model id and revision, a hash
of the model config, layer, position, languages, prompt counts, selection scores and the weightedit version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..errors import FilterFailedDirectionError, InvalidDirectionError, OptionsError
from ..io.atomic import atomic_file
from ..io.checkpoint import residual_width
from ..sources.model import public_name
from .profile import EditProfile

__all__ = [
    "Direction",
    "save_direction",
    "load_direction",
    "config_fingerprint",
    "combine_directions",
    "check_selection",
    "selection_failed_kl",
]

# Config keys that do not change the residual stream's basis (and untying changes the tie flag).
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "tie_word_embeddings",
    "quantization_config",
    "architectures",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_autoset",
}


def config_fingerprint(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the parts of ``config.json`` that define the residual stream."""
    stable = {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(stable, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Direction:
    """A unit refusal direction and where it came from.

    Attributes:
        vector: ``[d_model]`` float32, unit norm.
        layer: layer whose residual stream it was read from (``None`` if unknown).
        position: post-instruction position (negative index from the end of the prompt), if known.
        languages: languages of the prompts it was computed from.
        model: model id it was computed on; ``config_hash`` fingerprints that model's config.
        candidates: optional ``[n_layers, n_positions, d_model]`` tensor of all candidates.
        meta: everything else (prompt counts, scores, revision, ...).
        profile: the shape of the edit that goes with it (``weightedit optimize``); ``None`` is the full edit.
    """

    vector: torch.Tensor
    layer: int | None = None
    position: int | None = None
    languages: tuple[str, ...] = ()
    model: str | None = None
    config_hash: str | None = None
    candidates: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    profile: EditProfile | None = None

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    def sha256(self) -> str:
        """Hash of the vector's float32 bytes (what the edit depends on)."""
        return hashlib.sha256(self.vector.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()

    def check_model(self, config: dict[str, Any], *, allow_mismatch: bool = False, source: str = "direction") -> None:
        """Refuse a direction computed on a different model.

        Raises:
            InvalidDirectionError: d_model differs (always), or the config fingerprint differs (unless
                ``allow_mismatch``).
        """
        d_model = residual_width(config)
        if d_model is not None and d_model != self.d_model:
            raise InvalidDirectionError(
                f"{source} has d_model={self.d_model} but the model has hidden size {d_model}: use a direction "
                "computed on this model (weightedit direction --model ...)"
            )
        if self.config_hash and not allow_mismatch and self.config_hash != config_fingerprint(config):
            raise InvalidDirectionError(
                f"{source} was computed on {self.model or 'another model'} (config {self.config_hash}), not on this "
                f"one (config {config_fingerprint(config)}): recompute it on this model, or pass "
                "<<allow_model_mismatch>> if both share a residual basis (e.g. a fine-tune)"
            )


def selection_failed_kl(direction: Direction) -> bool:
    """Whether the direction's own selection recorded that it failed the KL filter (files without a record pass)."""
    selection = direction.meta.get("selection") if isinstance(direction.meta, dict) else None
    return isinstance(selection, dict) and selection.get("kl_filter_passed") is False


def check_selection(
    direction: Direction, *, allow_failing_filters: bool = False, source: str = "the direction"
) -> None:
    """Refuse a direction whose selection failed the KL filter, unless the caller accepts it.

    Raises:
        FilterFailedDirectionError: the direction's metadata records a failed KL filter.
    """
    if selection_failed_kl(direction) and not allow_failing_filters:
        selection = direction.meta["selection"]
        raise FilterFailedDirectionError(
            source=source, kl=selection.get("kl"), max_kl=(selection.get("filters") or {}).get("max_kl")
        )


def save_direction(direction: Direction, path: str | os.PathLike[str]) -> Path:
    """Write ``direction`` as a safetensors file (atomically: temp file, then rename)."""
    path = Path(path)
    tensors = {"direction": direction.vector.detach().to("cpu", torch.float32).contiguous()}
    if direction.candidates is not None:
        tensors["candidates"] = direction.candidates.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": "weightedit-direction",
        "weightedit_version": __version__,
        "d_model": str(direction.d_model),
        "layer": "" if direction.layer is None else str(direction.layer),
        "position": "" if direction.position is None else str(direction.position),
        "languages": ",".join(direction.languages),
        "model": public_name(direction.model) or "",
        "config_hash": direction.config_hash or "",
        "meta": json.dumps(direction.meta, sort_keys=True, default=str),
    }
    if direction.profile is not None:
        meta["edit_profile"] = json.dumps(direction.profile.to_json(), sort_keys=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_direction(path: str | os.PathLike[str]) -> Direction:
    """Read a direction file (weightedit safetensors, or any safetensors/``.pt``/``.npy`` holding one vector).

    Raises:
        InvalidDirectionError: the file is missing, unreadable, or holds no single vector.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidDirectionError(
            f"direction file {path} does not exist: compute one with `weightedit direction`", path=path
        )
    if path.is_dir():
        raise InvalidDirectionError(
            f"direction file {path} is a folder: pass the .safetensors file inside it "
            "(e.g. weightedit/refusal_direction.safetensors)",
            path=path,
        )
    if not path.is_file():
        raise InvalidDirectionError(
            f"direction file {path} is not a regular file (a pipe or device): pass a .safetensors file", path=path
        )
    meta: dict[str, str] = {}
    tensors: dict[str, Any]
    try:
        if path.suffix == ".npy":
            tensors = {"direction": torch.from_numpy(np.load(path))}
        elif path.suffix in {".pt", ".pth"}:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tensors = obj if isinstance(obj, dict) else {"direction": obj}
        else:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # the readers raise many unrelated types for a bad file
        raise InvalidDirectionError(
            f"cannot read direction file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", path=path
        ) from None
    if "direction" in tensors:
        vector = tensors["direction"]
    elif len(tensors) == 1:
        vector = next(iter(tensors.values()))
    else:
        raise InvalidDirectionError(
            f"{path} holds {len(tensors)} tensors and none is named 'direction': save the vector as 'direction'",
            path=path,
        )
    if not isinstance(vector, torch.Tensor):
        raise InvalidDirectionError(
            f"{path} holds a {type(vector).__name__}, not a tensor: save the direction as a float tensor", path=path
        )
    if vector.is_complex() or not vector.is_floating_point():
        raise InvalidDirectionError(
            f"{path}: the direction has dtype {str(vector.dtype).replace('torch.', '')}; a direction is a "
            "floating-point vector (float32, float16, bfloat16 or float64)",
            path=path,
        )
    if vector.dim() == 2 and vector.shape[0] == 1:
        vector = vector.reshape(-1)
    if vector.dim() != 1:
        raise InvalidDirectionError(
            f"{path}: the direction must be a vector, got shape {list(vector.shape)}", path=path
        )
    wide = vector.double()
    vector = vector.to(torch.float32)
    if bool(torch.isfinite(wide).all()) and not bool(torch.isfinite(vector).all()):
        # Only the direction matters: scale a vector whose values overflow float32 into range first.
        peak = float(wide.abs().max())
        vector = (wide / peak).to(torch.float32)
    if meta and not all(isinstance(v, str) for v in meta.values()):
        raise InvalidDirectionError(
            f"{path}: its metadata is not string-to-string: re-save the direction file", path=path
        )
    extra: Any = {}
    if meta.get("meta"):
        try:
            extra = json.loads(meta["meta"])
        except ValueError as e:
            raise InvalidDirectionError(
                f"{path}: its 'meta' metadata is not valid JSON ({e}): re-save the direction file", path=path
            ) from None
        if not isinstance(extra, dict):
            raise InvalidDirectionError(
                f"{path}: its 'meta' metadata is a JSON {type(extra).__name__}, not an object: re-save the direction file",
                path=path,
            )

    profile = None
    if meta.get("edit_profile"):
        try:
            profile = EditProfile.from_json(json.loads(meta["edit_profile"]))
        except (ValueError, OptionsError) as e:
            raise InvalidDirectionError(
                f"{path}: its edit profile is not valid ({e}): re-save the direction file", path=path
            ) from None

    def _int(key: str) -> int | None:
        value = meta.get(key, "")
        return int(value) if value.lstrip("-").isdigit() else None

    return Direction(
        vector=vector,
        layer=_int("layer"),
        position=_int("position"),
        languages=tuple(x for x in meta.get("languages", "").split(",") if x),
        model=meta.get("model") or None,
        config_hash=meta.get("config_hash") or None,
        candidates=tensors.get("candidates") if isinstance(tensors.get("candidates"), torch.Tensor) else None,
        meta=extra,
        profile=profile,
    )


def combine_directions(directions: list[Direction]) -> torch.Tensor:
    """Mean of unit directions, renormalized (``--direction-lang en,zh,ar``)."""
    if not directions:
        raise InvalidDirectionError("no directions to combine")
    units = [d.vector / d.vector.norm() for d in directions]
    mean = torch.stack(units).mean(0)
    if float(mean.norm()) < 1e-6:
        raise InvalidDirectionError("the directions cancel out (their mean is ~0): combine fewer languages")
    return mean / mean.norm()
