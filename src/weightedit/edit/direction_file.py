"""The direction file: a refusal direction plus the facts needed to trust it.

Format (``docs/architecture.md``, "File formats"): a safetensors file with ``direction`` (``[d_model]`` float32), optionally
``layer_directions`` (``[n_layers, d_model]``: one direction per decoder layer, see :attr:`Direction.layer_vectors`)
and ``candidates`` (``[n_layers, n_positions, d_model]``), and string metadata: model id and revision, a hash
of the model config, layer, position, languages, prompt counts, selection scores and the weightedit version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import FilterFailedDirectionError, InvalidCheckpointError, InvalidDirectionError, OptionsError
from ..io.atomic import atomic_file
from ..io.checkpoint import decoder_depth, read_header, residual_width
from ..sources.model import public_name
from .profile import EditProfile

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

__all__ = [
    "Direction",
    "DirectionHeader",
    "save_direction",
    "load_direction",
    "peek_direction",
    "config_fingerprint",
    "combine_directions",
    "check_selection",
    "selection_failed_kl",
    "checked_vector",
    "checked_rows",
    "LAYER_TENSOR",
    "vector_sha256",
]

# The per-layer rows' tensor name in a direction file.
LAYER_TENSOR = "layer_directions"

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
        layer_vectors: optional ``[n_layers, d_model]`` float32: a direction per decoder layer. When present, the
            writers of decoder layer ``l`` are edited along row ``l`` and the embeddings along ``vector``
            (``weightedit optimize --direction-scope per-layer``); ``None``: every writer along ``vector``.
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
    layer_vectors: torch.Tensor | None = None

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    @property
    def n_layer_rows(self) -> int | None:
        """How many per-layer rows the direction has (``None``: one direction for every writer)."""
        return None if self.layer_vectors is None else int(self.layer_vectors.shape[0])

    def sha256(self) -> str:
        """Hash of the vector's float32 bytes, then the per-layer directions' if any (what the edit depends on)."""
        import torch

        def f32(t: torch.Tensor) -> NDArray:
            return t.detach().to("cpu", torch.float32).contiguous().numpy()

        layers = None if self.layer_vectors is None else f32(self.layer_vectors)
        return vector_sha256(f32(self.vector), layers)

    def check_model(self, config: dict[str, Any], *, allow_mismatch: bool = False, source: str = "direction") -> None:
        """Refuse a direction computed on a different model.

        Raises:
            InvalidDirectionError: d_model differs (always), or the config fingerprint differs (unless
                ``allow_mismatch``).
        """
        _check_model(self, config, allow_mismatch=allow_mismatch, source=source)


@dataclass(frozen=True)
class DirectionHeader:
    """What a direction file says about itself, read without torch (:func:`peek_direction`): enough to check
    it against a model and its selection record before the vector is read (:meth:`load_vector`, no torch
    either), and to record where it came from."""

    path: Path
    tensor: str  # the name of the vector in the file
    d_model: int
    model: str | None
    config_hash: str | None
    meta: dict[str, Any]
    profile: EditProfile | None
    layer: int | None = None
    position: int | None = None
    languages: tuple[str, ...] = ()
    n_layer_rows: int | None = None  # rows of its ``layer_directions`` (None: it has none)

    def check_model(self, config: dict[str, Any], *, allow_mismatch: bool = False, source: str = "direction") -> None:
        """:meth:`Direction.check_model` on the file's metadata."""
        _check_model(self, config, allow_mismatch=allow_mismatch, source=source)

    def _read(self, name: str) -> NDArray:
        from ..io.checkpoint import read_array

        try:
            header = read_header(self.path)
            return read_array(header, header.tensors[name]).astype("float64")
        except (InvalidCheckpointError, KeyError, OSError):
            raise InvalidDirectionError(
                f"direction file {self.path} changed or became unreadable while it was read: save the direction "
                "again with `weightedit direction`",
                path=self.path,
            ) from None

    def load_vector(self) -> NDArray:
        """The vector as :func:`load_direction` reads it (float32, the same checks), with NumPy.

        Raises:
            InvalidDirectionError: the file changed since its header was read, or cannot be read.
        """
        return checked_vector(self._read(self.tensor), self.path)

    def load_rows(self) -> NDArray | None:
        """The per-layer rows as :func:`load_direction` reads them (float32 ``[n_layers, d_model]``, the same
        checks), with NumPy; ``None`` when the file has none.

        Raises:
            InvalidDirectionError: the rows are broken, or the file changed or cannot be read.
        """
        if self.n_layer_rows is None:
            return None
        return checked_rows(self._read(LAYER_TENSOR), self.d_model, self.path)


def vector_sha256(vector: NDArray, layers: NDArray | None = None) -> str:
    """Hash of a direction's float32 bytes, followed by its per-layer directions' when it has them (what the edit
    depends on; :meth:`Direction.sha256`). A direction without per-layer rows hashes as it always did."""
    h = hashlib.sha256(vector.astype("float32").tobytes())
    if layers is not None:
        h.update(layers.astype("float32").tobytes())
    return h.hexdigest()


def checked_vector(wide: NDArray, path: Path) -> NDArray:
    """A direction read from ``path`` (float64 values) as a float32 vector: ``[1, d]`` is flattened, a vector
    whose values overflow float32 is scaled into range first (only its direction matters).

    Raises:
        InvalidDirectionError: it is not a vector.
    """
    import numpy as np

    if wide.ndim == 2 and wide.shape[0] == 1:
        wide = wide.reshape(-1)
    if wide.ndim != 1:
        raise InvalidDirectionError(
            f"{path}: the direction must be a vector, got shape {list(wide.shape)}; save one [d_model] vector as "
            "'direction'",
            path=path,
        )
    with np.errstate(over="ignore"):
        vector = wide.astype(np.float32)
    if bool(np.isfinite(wide).all()) and not bool(np.isfinite(vector).all()):
        vector = (wide / np.abs(wide).max()).astype(np.float32)
    return vector


def _check_model(
    direction: Direction | DirectionHeader, config: dict[str, Any], *, allow_mismatch: bool, source: str
) -> None:
    """Refuse a direction (or a file's metadata) computed on a different model (see :meth:`Direction.check_model`)."""
    d_model = residual_width(config)
    if d_model is not None and d_model != direction.d_model:
        raise InvalidDirectionError(
            f"{source} has d_model={direction.d_model} but the model has hidden size {d_model}: use a direction "
            "computed on this model (weightedit direction --model ...)"
        )
    rows, n_layers = direction.n_layer_rows, decoder_depth(config)
    if rows is not None and rows != n_layers:
        raise InvalidDirectionError(
            f"{source} has directions for {rows} decoder layers but the model has "
            f"{n_layers if n_layers is not None else 'no layer count in its config'}: use a direction computed on "
            "this model (weightedit optimize --model ...)"
        )
    if direction.config_hash and not allow_mismatch and direction.config_hash != config_fingerprint(config):
        raise InvalidDirectionError(
            f"{source} was computed on {direction.model or 'another model'} (config {direction.config_hash}), not on this "
            f"one (config {config_fingerprint(config)}): recompute it on this model, or pass "
            "<<allow_model_mismatch>> if both share a residual basis (e.g. a fine-tune)"
        )


def selection_failed_kl(direction: Direction | DirectionHeader) -> bool:
    """Whether the direction's own selection recorded that it failed the KL filter (files without a record pass)."""
    selection = direction.meta.get("selection") if isinstance(direction.meta, dict) else None
    return isinstance(selection, dict) and selection.get("kl_filter_passed") is False


def check_selection(
    direction: Direction | DirectionHeader, *, allow_failing_filters: bool = False, source: str = "the direction"
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
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"direction": direction.vector.detach().to("cpu", torch.float32).contiguous()}
    if direction.layer_vectors is not None:
        rows = direction.layer_vectors.detach().to("cpu", torch.float64)
        checked_rows(rows.numpy(), direction.d_model, "the direction")  # a broken row is refused, not saved
        # A copy: the vector is often a view of one of the rows, and safetensors refuses shared storage.
        tensors[LAYER_TENSOR] = direction.layer_vectors.detach().to("cpu", torch.float32).clone()
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
    import numpy as np
    import torch
    from safetensors import safe_open

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
    vector = torch.from_numpy(checked_vector(vector.double().numpy(), path))
    if meta and not all(isinstance(v, str) for v in meta.values()):
        raise InvalidDirectionError(
            f"{path}: its metadata is not string-to-string: re-save the direction file", path=path
        )
    extra, profile = _parsed_meta(meta, path)
    layers = None
    if (rows := tensors.get(LAYER_TENSOR)) is not None:
        if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
            raise InvalidDirectionError(
                f"{path}: its {LAYER_TENSOR} are not a float tensor: re-save the direction with `weightedit optimize`",
                path=path,
            )
        layers = torch.from_numpy(checked_rows(rows.double().numpy(), int(vector.numel()), path))

    return Direction(
        vector=vector,
        layer=_meta_int(meta, "layer"),
        position=_meta_int(meta, "position"),
        languages=_meta_languages(meta),
        model=meta.get("model") or None,
        config_hash=meta.get("config_hash") or None,
        candidates=tensors.get("candidates") if isinstance(tensors.get("candidates"), torch.Tensor) else None,
        meta=extra,
        profile=profile,
        layer_vectors=layers,
    )


def checked_rows(wide: NDArray, d_model: int, path: Path | str) -> NDArray:
    """Per-layer rows (float64 values) as float32 ``[n_layers, d_model]``, each finite and nonzero.

    Raises:
        InvalidDirectionError: not ``[n_layers, d_model]`` float rows, or a row that is not finite or is zero
            (named).
    """
    import numpy as np

    if wide.ndim != 2 or wide.shape[0] < 1 or wide.shape[1] != d_model:
        raise InvalidDirectionError(
            f"{path}: its {LAYER_TENSOR} have shape {list(wide.shape)}, not [n_layers, {d_model}]: re-save the "
            "direction with `weightedit optimize`",
            path=Path(path),
        )
    for i, row in enumerate(wide):
        if not bool(np.isfinite(row).all()) or not bool(np.any(row)):
            raise InvalidDirectionError(
                f"{path}: row {i} of its {LAYER_TENSOR} is {'zero' if np.isfinite(row).all() else 'not finite'}: "
                "every decoder layer needs a direction; re-save the direction with `weightedit optimize`",
                path=Path(path),
            )
    with np.errstate(over="ignore"):
        rows = wide.astype(np.float32)
    overflow = ~np.isfinite(rows).all(axis=1)
    if overflow.any():  # only a row's direction matters: bring one that overflows float32 into range
        rows[overflow] = (wide[overflow] / np.abs(wide[overflow]).max(axis=1, keepdims=True)).astype(np.float32)
    return rows


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    value = meta.get(key, "")
    return int(value) if value.lstrip("-").isdigit() else None


def _meta_languages(meta: dict[str, str]) -> tuple[str, ...]:
    return tuple(x for x in meta.get("languages", "").split(",") if x)


def _parsed_meta(meta: dict[str, str], path: Path) -> tuple[dict[str, Any], EditProfile | None]:
    """The JSON-encoded parts of a direction file's metadata: its ``meta`` record and its edit profile."""
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

    return extra, profile


def peek_direction(path: str | os.PathLike[str]) -> DirectionHeader | None:
    """The metadata of a safetensors direction file, read without torch; ``None`` for any file
    :func:`load_direction` should judge itself (other formats, or anything unusual: it then names the problem).

    Raises:
        InvalidDirectionError: the file is a damaged or cut-short safetensors file.
    """
    path = Path(path)
    if path.suffix in {".npy", ".pt", ".pth"} or not path.is_file():
        return None
    try:
        header = read_header(path)
    except OSError:
        return None
    except InvalidCheckpointError:
        raise InvalidDirectionError(
            f"direction file {path} is not a complete safetensors file (damaged or cut short): save the direction "
            "again with `weightedit direction`",
            path=path,
        ) from None
    tensors = header.tensors
    rows = tensors.get(LAYER_TENSOR)
    if rows is not None and (not rows.is_float or len(rows.shape) != 2):
        return None  # load_direction names the problem
    info = tensors.get("direction") or (next(iter(tensors.values())) if len(tensors) == 1 else None)
    if info is None or not info.is_float:
        return None
    shape = info.shape[1:] if len(info.shape) == 2 and info.shape[0] == 1 else info.shape
    if len(shape) != 1:
        return None
    meta = header.metadata
    if meta and not all(isinstance(v, str) for v in meta.values()):
        return None
    try:
        extra, profile = _parsed_meta(meta, path)
    except InvalidDirectionError:
        return None
    return DirectionHeader(
        path=path,
        tensor=info.name,
        d_model=shape[0],
        model=meta.get("model") or None,
        config_hash=meta.get("config_hash") or None,
        meta=extra,
        profile=profile,
        layer=_meta_int(meta, "layer"),
        position=_meta_int(meta, "position"),
        languages=_meta_languages(meta),
        n_layer_rows=None if rows is None else rows.shape[0],
    )


def combine_directions(directions: list[Direction]) -> torch.Tensor:
    """Mean of unit directions, renormalized (``--direction-lang en,zh,ar``)."""
    import torch

    if not directions:
        raise InvalidDirectionError("no directions to combine")
    units = [d.vector / d.vector.norm() for d in directions]
    mean = torch.stack(units).mean(0)
    if float(mean.norm()) < 1e-6:
        raise InvalidDirectionError("the directions cancel out (their mean is ~0): combine fewer languages")
    return mean / mean.norm()
