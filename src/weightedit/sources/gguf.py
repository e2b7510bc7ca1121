"""GGUF input: dequantized once by transformers into a cached safetensors checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .._progress import status
from ..errors import InvalidCheckpointError, ModelNotFoundError, WeighteditError
from ..io.atomic import atomic_output_dir
from ..io.cache import cache_dir
from ..io.hashing import cached_sha256
from .model import ModelSource

__all__ = ["convert_gguf", "from_gguf"]


def from_gguf(path: Path, *, given: str, dtype: str, progress: bool) -> ModelSource:
    """A GGUF file as a :class:`ModelSource` (its converted checkpoint; the file itself counts as an input)."""
    folder, digest = convert_gguf(path, dtype=dtype, progress=progress)
    return ModelSource(
        folder=folder,
        given=given,
        kind="gguf",
        inputs=(path.resolve(), folder),
        details={"gguf_file": path.name, "gguf_sha256": digest, "gguf_dtype": dtype},
    )


def convert_gguf(path: Path, *, dtype: str = "bfloat16", progress: bool = True) -> tuple[Path, str]:
    """Dequantize a GGUF file into a cached safetensors checkpoint; return ``(folder, sha256 of the file)``.

    The conversion is keyed by the file's SHA-256 and the dtype, and written atomically, so a second call
    (or a second run of the demo) costs one hash of the file.
    """
    # torch and transformers load here, not at import: a cached conversion (every `weightedit fetch` of a
    # recipe after the first) needs neither, and importing them costs over a second of start-up.
    import torch

    path = Path(path).resolve()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidCheckpointError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'): check the path", path=path
        )
    with status(f"hashing {path.name}", enabled=progress):
        digest = cached_sha256(path)
    out = cache_dir() / "gguf" / f"{digest[:16]}-{dtype}"
    if (out / "config.json").exists():
        return out, digest
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise WeighteditError(
            f"unknown dtype {dtype!r} for GGUF conversion: use bfloat16, float16 or float32",
            option="gguf_dtype",
            value=dtype,
        )
    with (
        atomic_output_dir(out, overwrite=True, record=False) as tmp,
        status(f"dequantizing {path.name} (once; cached)", enabled=progress),
    ):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Releases that have GgufConfig load GGUF weights quantized unless told to dequantize; the earlier 5.x
        # releases have no such option and always dequantize.
        gguf_config = getattr(transformers, "GgufConfig", None)
        extra = {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype, **extra)
        except (ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if isinstance(e, (struct.error, EOFError, IndexError)):
                raise InvalidCheckpointError(
                    f"{path.name} is truncated or corrupted inside its GGUF header ({first}): re-download it", path=path
                ) from None
            raise ModelNotFoundError(f"transformers cannot load {path.name}: {first}", path=path) from None
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                raise ModelNotFoundError(
                    f"{path.name} did not dequantize fully ({name} is {tensor.dtype}); convert it to "
                    "safetensors with another tool first",
                    path=path,
                )
        # Every weight is a plain tensor now: drop the marker that makes save_pretrained refuse.
        # nn.Module types attribute assignment for tensors and modules; transformers keeps its quantizer (or None)
        # in a plain attribute.
        model.hf_quantizer = None  # type: ignore[assignment]
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
        model.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "weightedit-gguf.json").write_text(
            json.dumps({"gguf_file": path.name, "gguf_sha256": digest, "dtype": dtype}, indent=2) + "\n"
        )
        del model
    return out, digest
