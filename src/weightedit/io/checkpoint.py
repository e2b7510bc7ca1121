"""Reading and writing safetensors checkpoints without loading them.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each tensor name
to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the end of the header) plus an optional
``"__metadata__"`` dict of strings, then the raw tensor bytes. Everything here works on that layout
directly, so that untouched tensors can be copied as raw bytes and edited ones streamed in chunks.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidCheckpointError, ModelNotFoundError, QuantizedCheckpointError

__all__ = [
    "TensorInfo",
    "ShardHeader",
    "Checkpoint",
    "read_header",
    "encode_header",
    "DTYPES",
    "torch_dtype_of",
    "read_raw",
    "read_array",
    "WEIGHTS_INDEX_NAME",
    "SINGLE_WEIGHTS_NAME",
    "residual_width",
    "decoder_depth",
]

WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
# A header larger than this is certainly corrupt (the format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000

if TYPE_CHECKING:
    import numpy as np
    import torch

# safetensors dtype code -> (name of the torch dtype, or None when weightedit cannot do float math on it, bytes
# per item). Names, not torch objects: reading headers and planning an edit must not wait for torch to import.
DTYPES: dict[str, tuple[str | None, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": (None, 8),
    "I32": (None, 4),
    "I16": (None, 2),
    "I8": (None, 1),
    "U64": (None, 8),
    "U32": (None, 4),
    "U16": (None, 2),
    "U8": (None, 1),
    "BOOL": (None, 1),
    "F8_E4M3": (None, 1),
    "F8_E5M2": (None, 1),
    "F8_E8M0": (None, 1),
}

# Tensor-name suffixes that only exist in quantized checkpoints.
_QUANTIZED_SUFFIXES = (
    ".qweight",
    ".qzeros",
    ".g_idx",
    ".scales",
    ".absmax",
    ".quant_map",
    ".quant_state",
    ".SCB",
    ".weight_format",
    ".weight_scale",
    ".weight_scale_inv",
    ".input_scale",
)
_FULL_PRECISION_METHODS = {"gguf"}  # a folder converted from GGUF by weightedit holds plain tensors


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a shard header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset from the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        """Whether weightedit can do float math on this tensor (F64, F32, F16, BF16)."""
        return DTYPES[self.dtype][0] is not None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype of a float tensor (imports torch), None for any other dtype."""
        return torch_dtype_of(self.dtype)


def torch_dtype_of(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype code (imports torch), None when weightedit does no float math on it."""
    name = DTYPES[code][0]
    if name is None:
        return None
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class ShardHeader:
    """A parsed and validated safetensors header."""

    path: Path
    header_size: int  # length of the JSON header in bytes (without the 8-byte prefix)
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def ordered(self) -> list[TensorInfo]:
        """Tensors in the order their bytes appear in the file."""
        return sorted(self.tensors.values(), key=lambda t: t.start)


def read_header(path: Path) -> ShardHeader:
    """Parse and validate the header of ``path``.

    Checks the header length, the JSON, every tensor's dtype, shape and byte range, that the data section
    has no gaps or overlaps, and that the file is exactly as long as the header says (no truncation).

    Raises:
        InvalidCheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InvalidCheckpointError(
                    f"{path} is not a safetensors file ({size} bytes, shorter than the 8-byte header "
                    "length): re-download or re-save the checkpoint",
                    path=path,
                )
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise InvalidCheckpointError(
                    f"{path} has a corrupted safetensors header (declared header length {n}, file size "
                    f"{size}): re-download or re-save the checkpoint",
                    path=path,
                )
            raw = f.read(n)
    except OSError as e:
        raise InvalidCheckpointError(
            f"cannot read {path}: {e.strerror or e}; check the path and permissions", path=path
        ) from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidCheckpointError(
            f"{path} has a corrupted safetensors header ({e}): re-download or re-save the checkpoint", path=path
        ) from None

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InvalidCheckpointError(
            f"{path}: its safetensors __metadata__ is a JSON {type(metadata).__name__}, not an object of strings; "
            "re-save the file",
            path=path,
        )
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(_whole(s) for s in entry["shape"])
            start, end = (_whole(o) for o in entry["data_offsets"])
            if not isinstance(dtype, str) or len(entry["data_offsets"]) != 2:
                raise ValueError(dtype)
        except (KeyError, TypeError, ValueError):
            raise InvalidCheckpointError(
                f"{path} has a corrupted header entry for tensor {name!r} (shape and offsets must be whole "
                "numbers): re-download or re-save the checkpoint",
                path=path,
            ) from None
        if dtype not in DTYPES:
            raise InvalidCheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype!r}, which weightedit does not know; "
                "convert the checkpoint to bf16/fp16/fp32 safetensors",
                path=path,
            )
        info = TensorInfo(name, dtype, shape, start, end)
        if end < start or info.nbytes != info.numel * DTYPES[dtype][1]:
            raise InvalidCheckpointError(
                f"{path}: tensor {name!r} has byte range [{start}, {end}) inconsistent with shape {list(shape)} "
                f"and dtype {dtype}: the header is corrupted; re-download or re-save the checkpoint",
                path=path,
            )
        tensors[name] = info

    expected = 0
    for info in sorted(tensors.values(), key=lambda t: t.start):
        if info.start != expected:
            raise InvalidCheckpointError(
                f"{path}: tensor {info.name!r} starts at byte {info.start}, expected {expected} (gap or overlap "
                "in the data section): the file is corrupted; re-download or re-save the checkpoint",
                path=path,
            )
        expected = info.end
    if 8 + n + expected != size:
        what = "truncated" if 8 + n + expected > size else "longer than its header says"
        raise InvalidCheckpointError(
            f"{path} is {what} ({size} bytes on disk, {8 + n + expected} expected from its header): "
            "re-download or re-save the checkpoint",
            path=path,
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidCheckpointError(
            f"{path}: safetensors metadata must map strings to strings; re-save the file", path=path
        )
    return ShardHeader(path=path, header_size=n, tensors=tensors, metadata=dict(metadata), file_size=size)


def _whole(value: Any) -> int:
    """A non-negative JSON integer (``32.5``, ``true`` or ``"3"`` are refused, as the safetensors library does)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str]) -> bytes:
    """Serialize a header (8-byte length prefix + JSON, space-padded to an 8-byte boundary).

    Args:
        tensors: ``(name, dtype code, shape, start, end)`` for each tensor.
        metadata: string-to-string metadata stored under ``__metadata__``.
    """
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, start, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


# Where configs store the width of the residual stream: most families, GPT-2, a few others; multimodal
# configs keep it in their text config.
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def residual_width(config: Mapping[str, Any] | Any) -> int | None:
    """``d_model`` of a ``config.json`` dict or a ``PretrainedConfig``, or ``None`` if the config does not say."""
    return _config_int(config, _WIDTH_KEYS)


def decoder_depth(config: Mapping[str, Any] | Any) -> int | None:
    """The number of decoder layers of a ``config.json`` dict or a ``PretrainedConfig``, or ``None``."""
    return _config_int(config, _DEPTH_KEYS)


def _config_int(config: Mapping[str, Any] | Any, keys: tuple[str, ...]) -> int | None:
    def get(cfg: Any, key: str) -> Any:
        return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)

    for cfg in (config, get(config, "text_config")):
        if cfg is None:
            continue
        for key in keys:
            value = get(cfg, key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


@dataclass
class Checkpoint:
    """A local ``save_pretrained`` folder with safetensors weights, opened lazily (headers only)."""

    folder: Path
    config: dict[str, Any]
    shards: list[ShardHeader]
    index: dict[str, Any] | None
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> Checkpoint:
        """Open ``folder``, read ``config.json`` and every shard header, and validate the index.

        Raises:
            ModelNotFoundError: the folder or its config is missing.
            InvalidCheckpointError: no safetensors weights, or a corrupt/truncated shard or index.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"model folder {folder} does not exist: pass a save_pretrained folder, a .gguf file, "
                "a Hub id, or recipe:NAME",
                path=folder,
            )
        config_path = folder / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"{folder} has no config.json: pass a transformers save_pretrained folder "
                "(or a .gguf file with <<gguf_file>>)",
                path=folder,
            ) from None
        except (OSError, ValueError) as e:
            raise InvalidCheckpointError(
                f"cannot read {config_path}: {e}; fix or re-download config.json", path=config_path
            ) from None
        if not isinstance(config, dict):
            raise InvalidCheckpointError(
                f"{config_path} holds a JSON {type(config).__name__}, not an object: fix or re-download config.json",
                path=config_path,
            )

        index_path = folder / WEIGHTS_INDEX_NAME
        index = None
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map = dict(index["weight_map"])
            except (OSError, ValueError, KeyError, TypeError):
                raise InvalidCheckpointError(
                    f"{index_path} is not a valid safetensors index: re-download or re-save the checkpoint",
                    path=index_path,
                ) from None
            bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
            if bad is not None:
                raise InvalidCheckpointError(
                    f"{index_path.name} maps tensor {bad[0]!r} to {bad[1]!r}, not to a shard file name: "
                    "re-download or re-save the checkpoint",
                    path=index_path,
                )
            escaping = next((v for v in weight_map.values() if Path(v).name != v), None)
            if escaping is not None:
                raise InvalidCheckpointError(
                    f"{index_path.name} lists shard {escaping!r}, which is not a file name inside the model folder: "
                    "re-download or re-save the checkpoint",
                    path=index_path,
                )
            shard_names = sorted(set(weight_map.values()))
        elif (folder / SINGLE_WEIGHTS_NAME).exists():
            shard_names = [SINGLE_WEIGHTS_NAME]
            weight_map = {}
        else:
            others = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
            hint = (
                f" (found {', '.join(others[:3])}: pass a .gguf file directly, or convert .bin weights with "
                "transformers' save_pretrained)"
                if others
                else ""
            )
            raise InvalidCheckpointError(f"{folder} has no safetensors weights{hint}", path=folder)

        shards = []
        for name in shard_names:
            path = folder / name
            if not path.exists():
                raise InvalidCheckpointError(
                    f"{index_path.name} lists shard {name}, which is missing from {folder}: re-download the checkpoint",
                    path=path,
                )
            shards.append(read_header(path))
        seen: dict[str, str] = {}
        for shard in shards:
            for tname in shard.tensors:
                if tname in seen:
                    raise InvalidCheckpointError(
                        f"tensor {tname!r} appears in both {seen[tname]} and {shard.path.name}: the checkpoint is corrupted",
                        path=shard.path,
                    )
                seen[tname] = shard.path.name
        if index is not None and seen != weight_map:
            wrong = sorted(k for k in weight_map if seen.get(k) != weight_map[k])
            if wrong:
                name = wrong[0]
                where = f"it is stored in {seen[name]}" if name in seen else f"{weight_map[name]} does not hold it"
                raise InvalidCheckpointError(
                    f"{index_path.name} maps tensor {name!r} to {weight_map[name]}, but {where}"
                    f"{f' ({len(wrong)} tensors wrong)' if len(wrong) > 1 else ''}: re-download or re-save the checkpoint",
                    path=index_path,
                )
            extra = sorted(set(seen) - set(weight_map))[:3]
            raise InvalidCheckpointError(
                f"{index_path.name} does not list tensors its shards hold ({extra}): re-download or re-save the checkpoint",
                path=index_path,
            )
        return cls(folder=folder, config=config, shards=shards, index=index, weight_map=seen)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def d_model(self) -> int:
        width = residual_width(self.config)
        if width is not None:
            return width
        raise InvalidCheckpointError(
            f"{self.folder}/config.json has no hidden_size: cannot tell the residual-stream width",
            path=self.folder / "config.json",
        )

    def tensors(self) -> Iterator[tuple[ShardHeader, TensorInfo]]:
        for shard in self.shards:
            for info in shard.ordered():
                yield shard, info

    def find(self, name: str) -> tuple[ShardHeader, TensorInfo]:
        for shard in self.shards:
            if name in shard.tensors:
                return shard, shard.tensors[name]
        raise KeyError(name)

    def read_array(self, name: str) -> np.ndarray:
        """A float tensor's values as a NumPy array in its compute dtype, without torch (:func:`read_array`)."""
        shard, info = self.find(name)
        return read_array(shard, info)

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one (small) tensor fully into memory."""
        shard, info = self.find(name)
        return read_tensor_bytes(shard, info)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors())

    def check_not_quantized(self) -> None:
        """Raise if the checkpoint stores quantized weights that cannot be edited in full precision."""
        qc = self.config.get("quantization_config")
        method = (qc or {}).get("quant_method") if isinstance(qc, dict) else None
        if qc and method not in _FULL_PRECISION_METHODS:
            raise QuantizedCheckpointError(
                f"{self.folder} is a quantized checkpoint ({method or 'unknown method'}): weightedit edits "
                "full-precision weights; use the unquantized model, or dequantize it and save_pretrained in bf16",
                path=self.folder,
            )
        for _, info in self.tensors():
            if info.name.endswith(_QUANTIZED_SUFFIXES):
                raise QuantizedCheckpointError(
                    f"{self.folder} holds quantized tensors (e.g. {info.name!r}): weightedit edits "
                    "full-precision weights; use the unquantized model, or dequantize it and save_pretrained in bf16",
                    path=self.folder,
                )


def read_raw(shard: ShardHeader, info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> np.ndarray:
    """The bytes of ``info`` (or of rows ``[row_start, row_end)`` of its first axis) in a new ``uint8`` array."""
    import numpy as np

    rows = info.shape[0] if info.shape else 1
    row_end = rows if row_end is None else row_end
    row_bytes = info.nbytes // rows if rows else 0
    start = shard.data_start + info.start + row_start * row_bytes
    length = (row_end - row_start) * row_bytes
    raw = np.empty(length, dtype=np.uint8)  # not zero-filled, unlike bytearray
    got = 0
    if length:
        with open(shard.path, "rb", buffering=0) as f:
            f.seek(start)
            view = raw.data
            while got < length and (n := f.readinto(view[got:])):
                got += n
    if got != length:
        raise InvalidCheckpointError(
            f"{shard.path} is truncated while reading {info.name!r}: re-download it", path=shard.path
        )
    return raw


def _float_info(shard: ShardHeader, info: TensorInfo) -> None:
    if not info.is_float:
        raise InvalidCheckpointError(f"tensor {info.name!r} has non-float dtype {info.dtype}", path=shard.path)


def read_array(shard: ShardHeader, info: TensorInfo) -> np.ndarray:
    """A float tensor's values as a NumPy array in its compute dtype (float32, float64 for F64), without torch."""
    from .floats import widened

    _float_info(shard, info)
    return widened(read_raw(shard, info), info.dtype, info.shape)


def read_tensor_bytes(
    shard: ShardHeader, info: TensorInfo, row_start: int = 0, row_end: int | None = None
) -> torch.Tensor:
    """Read ``info`` (or rows ``[row_start, row_end)`` of its first axis) from disk into a new tensor."""
    _float_info(shard, info)
    dtype = info.torch_dtype
    assert dtype is not None  # a float tensor
    rows = info.shape[0] if info.shape else 1
    row_end = rows if row_end is None else row_end
    shape = (row_end - row_start, *info.shape[1:]) if info.shape else ()
    import torch

    return torch.from_numpy(read_raw(shard, info, row_start, row_end)).view(dtype).reshape(shape)
