"""Small helpers shared by the tests."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


def folder_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (to prove an input was not touched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                tensors[k] = sf.get_tensor(k)
    return tensors


def raw_bytes(folder: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes."""
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in load_tensors(folder).items()}


def strip_chat_template(folder: Path) -> None:
    """Remove the chat template from a saved tokenizer, as in a base model."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def logit_tolerance(*, n_layers: int, weight_dtype: torch.dtype, logit_scale: float) -> float:
    """How far two float32 computations of the same logits may differ from rounding alone.

    The edited checkpoint stores ``W - r rᵀW`` rounded to ``weight_dtype`` (relative error ≤ eps/2 per entry), and
    both it and the hook-ablated original run in float32, where each block adds relative error of order eps to
    the residual stream. The two sub-blocks of each of ``n_layers`` blocks contribute independent errors, which add
    in quadrature: relative error ≈ eps·√(2·n_layers). The factor 16 covers the few roundings per sub-block (two
    matmuls, a norm, a residual add) and leaves margin; it was fixed from this argument, not fitted to a
    measurement. Scaled by the largest logit, since errors are relative. A broken edit moves logits by > 1e-2.
    """
    eps = max(torch.finfo(weight_dtype).eps, torch.finfo(torch.float32).eps)
    return 16.0 * eps * math.sqrt(2 * n_layers) * logit_scale


class PrefixJudge:
    """A judge for tiny models whose "refusal" is a token no phrase list knows (the planted model's REFUSE)."""

    name = "prefix"

    def __init__(self, prefix: str = "REFUSE") -> None:
        self.prefix = prefix

    def judge(self, completions: list[str], langs: list[str]) -> list[bool]:
        return [c.strip().startswith(self.prefix) for c in completions]
