"""Running a model: loading with dtype/device choices, chat formatting, batching.

Only direction computation and evaluation run the model; the edit itself never does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._progress import status
from ..edit.arch import spec_for_config
from ..errors import ChatTemplateError, InvalidCheckpointError, ModelNotFoundError
from ..io.checkpoint import residual_width
from ..sources import resolve_model
from ..sources.model import ModelSource
from .hooks import decoder_layers
from .options import Dtype, ModelLoadOptions, dtype_option

__all__ = [
    "ModelLoadOptions",
    "Dtype",
    "LoadedModel",
    "load_model",
    "resolve_dtype",
    "format_chat",
    "post_instruction_length",
    "batches",
    "Batch",
]

# Two instructions that share no trailing characters, used to find where the template's suffix starts.
_PROBE_A = "Say the word apple"
_PROBE_B = "List two colors, please?"


def resolve_dtype(dtype: Dtype | str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto`` = float32 on CPU (bf16 matmuls are ~80× slower on AVX2-only CPUs), bf16 on GPUs that support it.

    Raises:
        OptionsError: ``dtype`` is not one of :class:`Dtype`.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    choice = dtype_option(dtype)
    if choice is Dtype.AUTO:
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if dev.type == "cuda":
            return torch.float16
        return torch.float32
    value: torch.dtype = getattr(torch, choice.value)
    return value


def _default_device(device_map: str | None) -> str:
    if device_map in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_map


@dataclass
class LoadedModel:
    """A model ready to run, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: torch.dtype
    n_post: int  # post-instruction tokens of the chat template
    chat_template: str | None = None
    # Compute the keys and values of the prompt prefix shared by a whole call (system prompt, template
    # header) once, instead of once per prompt. Off for families whose attention mixes the prefix in a way
    # a plain cache does not reproduce (sliding windows shorter than a prompt).
    prefix_caching: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        width = residual_width(self.model.config)
        if width is None:
            raise InvalidCheckpointError(
                f"{self.source.public_name}/config.json has no hidden_size: cannot tell the residual-stream width",
                path=Path(self.source.folder) / "config.json",
            )
        return width

    def format(self, instructions: Sequence[str]) -> list[str]:
        return [format_chat(self.tokenizer, text, self.chat_template) for text in instructions]


def load_model(
    model: str | os.PathLike[str] | ModelSource,
    options: ModelLoadOptions | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a model (folder, .gguf, Hub id, recipe:NAME) for inference, in eval mode.

    Args:
        options: dtype, device map, chat template and remote code (:class:`ModelLoadOptions`; default: auto
            dtype, one device, the tokenizer's own template, no remote code).
        revision, token: for a Hub id (a resolved :class:`ModelSource` ignores them).

    Raises:
        ChatTemplateError: the tokenizer has no chat template and none was given.
    """
    # transformers loads here, not at import: `weightedit card` and `push` import the evaluation report (and so
    # this module) but never load a model, and importing transformers costs them about two seconds.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options or ModelLoadOptions()
    device_map = options.device_map
    source = (
        model
        if isinstance(model, ModelSource)
        else resolve_model(model, revision=revision, token=token, progress=progress)
    )
    device = _default_device(device_map)
    torch_dtype = resolve_dtype(options.dtype, device)
    tokenizer = _load_tokenizer(AutoTokenizer, source, trust_remote_code=options.trust_remote_code)
    template = None
    if options.chat_template is not None:
        path = Path(options.chat_template)
        if not path.is_file():
            raise ChatTemplateError(
                f"<<chat_template>> {path} does not exist: pass a Jinja chat template file",
                path=path,
                option="chat_template",
                value=options.chat_template,
            )
        template = path.read_text(encoding="utf-8")
    elif not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{source.given} has no chat template (it may be a base model): use an instruction-tuned model, "
            "or pass <<chat_template>> FILE with a Jinja template",
            path=source.folder,
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": options.trust_remote_code}
    if device_map == "auto":
        kwargs["device_map"] = "auto"
    with status(f"loading {source.given} ({str(torch_dtype).replace('torch.', '')}, {device})", enabled=progress):
        hf_model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    if device_map != "auto":
        # transformers wraps PreTrainedModel.to in a decorator whose type names the model as its only argument.
        hf_model.to(device)  # type: ignore[arg-type]
    hf_model.eval()
    spec_for_config(hf_model.config)  # fail early on an unsupported family
    loaded = LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        source=source,
        dtype=torch_dtype,
        n_post=0,
        chat_template=template,
        prefix_caching=_prefix_caching_safe(hf_model.config),
    )
    loaded.n_post = post_instruction_length(tokenizer, template)
    return loaded


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _load_tokenizer(auto: Any, source: ModelSource, *, trust_remote_code: bool) -> Any:
    """The model's tokenizer, or a one-line error when its folder has none (or transformers cannot read it)."""
    folder = Path(source.folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise ModelNotFoundError(
            f"{source.public_name} has no tokenizer files (tokenizer.json or tokenizer_config.json): copy them "
            "from the model it was made from into its folder",
            path=folder,
        )
    try:
        return auto.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelNotFoundError(
            f"transformers cannot load the tokenizer of {source.public_name} ({first}): check its tokenizer files",
            path=folder,
        ) from None


def _prefix_caching_safe(config: Any) -> bool:
    """A cached prefix followed by padding shifts key indices; that only matters inside a short sliding window."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return True
    return int(window) >= 1024  # far longer than any prompt weightedit runs


_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def format_chat(tokenizer: Any, instruction: str, template: str | None = None) -> str:
    """The prompt text for one user turn, ending where the assistant's answer starts.

    Reasoning templates are rendered with thinking disabled (``enable_thinking=False``, which Qwen3-style
    templates read and others ignore); a template that still leaves a ``<think>`` block open gets it closed
    empty, so that the first token after the prompt is an answer token, not the start of a reasoning trace.
    """
    messages = [{"role": "user", "content": instruction}]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=template, enable_thinking=False
        )
    except Exception as e:  # jinja errors come in many types
        raise ChatTemplateError(f"the chat template failed to render a user message: {e}") from None
    opened = text.rfind(_THINK_OPEN)
    if opened >= 0 and text.find(_THINK_CLOSE, opened) < 0 and text.rfind(instruction) < opened:
        text = text.rstrip("\n") + "\n\n" + _THINK_CLOSE + "\n\n"
    return text


def post_instruction_length(tokenizer: Any, template: str | None = None) -> int:
    """Number of tokens the template puts after the user's text (``<|im_end|>\\n<|im_start|>assistant\\n`` -> 5).

    The template is rendered around a sentinel instruction; the post-instruction tokens are those that
    start after the sentinel's last character (from the fast tokenizer's offsets). Tokenizers without
    offsets fall back to the longest common token suffix of two different instructions.
    """
    rendered = format_chat(tokenizer, _PROBE_A, template)
    end = rendered.rindex(_PROBE_A) + len(_PROBE_A)
    n = 0
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        n = sum(1 for start, stop in enc["offset_mapping"] if start >= end and stop > start)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        a = tokenizer(rendered, add_special_tokens=False).input_ids
        b = tokenizer(format_chat(tokenizer, _PROBE_B, template), add_special_tokens=False).input_ids
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
    if n == 0:
        raise ChatTemplateError(
            "the chat template puts no tokens after the user's text, so there is no post-instruction position; "
            "pass <<chat_template>> FILE with a template that ends with the assistant header"
        )
    return n


@dataclass
class Batch:
    index: list[int]  # positions of these prompts in the input list
    input_ids: torch.Tensor  # [batch, length], left-padded (after ``prefix`` when there is one)
    attention_mask: torch.Tensor
    prefix: torch.Tensor | None = None  # token ids shared by every prompt of the call, [prefix_len]


def shared_prefix(loaded: LoadedModel, token_lists: Sequence[list[int]]) -> int:
    """Length of the token prefix every prompt shares (system prompt and template header), keeping at least
    one token of each prompt and the post-instruction tokens out of it."""
    if len(token_lists) < 2:
        return 0
    shortest = min(len(t) for t in token_lists)
    n = 0
    first = token_lists[0]
    while n < shortest - loaded.n_post - 1 and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n


def batches(
    loaded: LoadedModel, texts: Sequence[str], batch_size: int, *, split_prefix: bool = False
) -> Iterator[Batch]:
    """Tokenized, left-padded batches, longest prompts first (less padding), on the model's device.

    With ``split_prefix`` the token prefix shared by all ``texts`` is taken off every row and returned in
    ``Batch.prefix``, so that its keys and values can be computed once for the whole call.
    """
    tok = loaded.tokenizer
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    cut = shared_prefix(loaded, ids) if split_prefix else 0
    prefix = torch.tensor(ids[0][:cut], device=loaded.device) if cut else None
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    pad = tok.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [ids[i][cut:] for i in idx]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r) :] = 1
        yield Batch(idx, input_ids.to(loaded.device), mask.to(loaded.device), prefix)
