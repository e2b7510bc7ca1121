"""Build a small *defended* variant of a chat model, for ``weightedit verify-defence`` to attack.

    python bench/defended_model.py --out /tmp/defended                       # the demo model, English
    python bench/defended_model.py --model recipe:qwen2.5-coder-0.5b-instruct --langs en,zh --steps 80 --out DIR
    weightedit verify-defence --model /tmp/defended --base-model recipe:qwen2.5-coder-1.5b-instruct --out v/

The defence follows the idea of training against the attack (published as DeepRefusal and as refusal
feature adversarial training): the model is fine-tuned, with a small LoRA adapter (``peft``), to keep refusing
harmful requests while refusal directions are ablated from its residual stream, so that its refusal no longer
rests on one direction. Steps:

1. Directions. The mean difference of the harmful and harmless *fit* prompts (train split of ``--langs``) at
   the last prompt position, at every layer, normalised: one candidate refusal direction per layer.
2. Targets. The model's own greedy completions (``--target-tokens``): of the harmful fit prompts, those the
   judge calls refusals (what the model should keep saying); of the harmless fit prompts, all (what it should
   keep doing).
3. Training. ``--steps`` steps of AdamW on the adapter; each step takes a batch of harmful and harmless
   examples, and with probability ``--ablate-prob`` runs it with one direction ablated at every block (the
   ablation hooks ``verify-defence``'s activation attack uses): a layer's direction, or a random mixture of
   several layers' directions with noise, so that no single direction carries the refusal any more. The
   loss is the cross-entropy of the target tokens.
4. Output. The adapter is merged, the weights rounded to the checkpoint's dtype, and the model saved in it as
   a ``save_pretrained`` folder (atomically), with ``defended.json`` (settings, losses, timings, the check).
5. A check on the *select* split (no prompt the attack or the evaluation judges on): judged refusal of the
   harmful prompts with and without ablation of the strongest probed layer's direction, base and defended (the
   defended model with its weights already rounded to the saved dtype, so the check is of what is saved).

The test split stays unseen, so ``verify-defence`` (which attacks with the select split and judges on test)
measures the defence on prompts it was not trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightedit.evaluation.judges import make_judge
from weightedit.evaluation.metrics import generate_ids
from weightedit.io.atomic import atomic_output_dir
from weightedit.prompts import parse_languages, role_prompts
from weightedit.runtime.activations import capture_means
from weightedit.runtime.hooks import ablate, decoder_layers, project_away, writer_modules
from weightedit.runtime.modeling import LoadedModel, load_model
from weightedit.runtime.options import ModelLoadOptions


@dataclass(frozen=True)
class Example:
    prompt: list[int]  # chat-formatted prompt tokens
    target: list[int]  # the completion the model is trained to give
    harmful: bool


@dataclass
class Training:
    directions: torch.Tensor  # [n_layers, d_model], unit rows
    losses: list[float] = field(default_factory=list)
    ablated: list[bool] = field(default_factory=list)
    seconds: float = 0.0


def layer_directions(
    loaded: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Unit mean-difference directions at the last prompt position of every layer, ``[n_layers, d_model]``."""
    keep = loaded.n_post
    loaded.n_post = 1
    try:
        bad = capture_means(loaded, loaded.format(harmful), batch_size=batch_size).means[:, 0]
        good = capture_means(loaded, loaded.format(harmless), batch_size=batch_size).means[:, 0]
    finally:
        loaded.n_post = keep
    diff = (bad - good).float()
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def make_examples(
    loaded: LoadedModel,
    harmful: Sequence[tuple[str, str]],
    harmless: Sequence[tuple[str, str]],
    *,
    is_refusal: Callable[[str, str], bool],
    target_tokens: int,
    batch_size: int,
) -> tuple[list[Example], dict[str, int]]:
    """The model's own completions as targets: refusals of the harmful prompts it refuses, answers to the rest.

    ``harmful``/``harmless`` hold ``(lang, instruction)`` pairs.
    """
    tok = loaded.tokenizer
    examples: list[Example] = []
    counts = {"harmful": len(harmful), "harmful_refused": 0, "harmless": len(harmless)}
    for pairs, is_harmful in ((harmful, True), (harmless, False)):
        texts = loaded.format([text for _, text in pairs])
        outs = generate_ids(loaded, texts, max_new_tokens=target_tokens, batch_size=batch_size)
        for (lang, _), text, ids in zip(pairs, texts, outs, strict=True):
            if not ids:
                continue
            if is_harmful:
                if not is_refusal(tok.decode(ids, skip_special_tokens=True).strip(), lang):
                    continue
                counts["harmful_refused"] += 1
            examples.append(Example(tok(text, add_special_tokens=False).input_ids, list(ids), is_harmful))
    return examples, counts


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs, attention mask and labels (prompt and padding masked out with -100)."""
    width = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        row = e.prompt + e.target
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(e.prompt) : len(row)] = torch.tensor(e.target)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def attack_direction(directions: torch.Tensor, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
    """What one training step ablates: a layer's direction (half the time) or a noisy mixture of several."""
    n = directions.shape[0]
    lo, hi = n // 4, max(n // 4 + 1, (17 * n) // 20)  # the layers where refusal directions are read
    # A layer where harmful and harmless prompts do not differ (e.g. the embeddings of the last template
    # token) has no direction.
    layers = [i for i in range(lo, hi) if float(directions[i].norm()) > 0] or [
        i for i in range(n) if float(directions[i].norm()) > 0
    ]
    if rng.random() < 0.5:
        return directions[rng.choice(layers)]
    picks = rng.sample(layers, k=min(3, len(layers)))
    weights = torch.rand(len(picks), generator=generator) + 0.5
    mix = (weights[:, None] * directions[picks]).sum(0)
    mix = mix / mix.norm()
    noise = torch.randn(mix.shape, generator=generator)
    noise = noise - (noise @ mix) * mix
    v = mix + 0.3 * noise / noise.norm()
    return v / v.norm()


@contextlib.contextmanager
def ablated(model: Any, writers: Sequence[Any], direction: torch.Tensor) -> Iterator[None]:
    """``direction`` removed from every block's input and output and from every writer's output.

    The same hooks as :func:`weightedit.runtime.hooks.ablate`, with the writer modules given: under a LoRA
    adapter a writer is the adapter's wrapper (its output includes the adapter's update), which the
    architecture's parameter names no longer match.
    """
    r = direction / direction.norm()

    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # e.g. a mixture-of-experts block: (hidden, router logits)
            return (project_away(output[0], r), *output[1:])
        return project_away(output, r)

    handles = [w.register_forward_hook(hook) for w in writers]
    try:
        with ablate(model, r, layers=range(len(decoder_layers(model)))):
            yield
    finally:
        for h in handles:
            h.remove()


def train_defence(
    loaded: LoadedModel,
    examples: Sequence[Example],
    directions: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    rank: int,
    lr: float,
    ablate_prob: float,
    target_modules: str | list[str] = "all-linear",
    seed: int = 0,
    progress: Callable[[int, float], object] = lambda step, loss: None,
) -> tuple[Any, Training]:
    """Fine-tune a LoRA adapter so that refusal survives ablation; return the merged model and the record."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target_modules)
    # Where the writers are, by module path: the adapter replaces each wrapped module at the same path.
    writer_ids = {id(m) for m in writer_modules(loaded.model)}
    writer_paths = [name for name, m in loaded.model.named_modules() if id(m) in writer_ids]
    model = get_peft_model(loaded.model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    harmful = [e for e in examples if e.harmful]
    harmless = [e for e in examples if not e.harmful]
    if not harmful:
        raise SystemExit("the model refused none of the harmful fit prompts: there is no refusal to defend")
    record = Training(directions=directions)
    pad = loaded.tokenizer.pad_token_id
    inner = model.get_base_model()
    writers = [inner.get_submodule(path) for path in writer_paths]
    started = time.perf_counter()
    for step in range(steps):
        half = max(1, batch_size // 2)
        batch = rng.sample(harmful, min(half, len(harmful))) + rng.sample(harmless, min(half, len(harmless)))
        inputs = {k: v.to(loaded.device) for k, v in collate(batch, pad).items()}
        under_attack = rng.random() < ablate_prob
        if under_attack:
            with ablated(inner, writers, attack_direction(directions, rng, generator).to(loaded.device, loaded.dtype)):
                loss = model(**inputs).loss
        else:
            loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SystemExit(f"training diverged at step {step} (loss {value}): lower --lr")
        record.losses.append(value)
        record.ablated.append(under_attack)
        progress(step, value)
    record.seconds = time.perf_counter() - started
    merged = model.merge_and_unload()
    merged.eval()
    return merged, record


def judged_refusal(
    loaded: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    is_refusal: Callable[[str, str], bool],
    *,
    direction: torch.Tensor | None,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[int, int]:
    """Refusals among greedy completions of ``pairs``, with ``direction`` ablated when given: ``(k, n)``."""
    texts = loaded.format([t for _, t in pairs])

    def run() -> list[list[int]]:
        return generate_ids(loaded, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)

    if direction is None:
        outs = run()
    else:
        with ablate(loaded.model, direction.to(loaded.device, loaded.dtype)):
            outs = run()
    tok = loaded.tokenizer
    k = sum(
        is_refusal(tok.decode(o, skip_special_tokens=True).strip(), lang)
        for (lang, _), o in zip(pairs, outs, strict=True)
    )
    return k, len(pairs)


def strongest_layer(
    loaded: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    directions: torch.Tensor,
    is_refusal: Callable[[str, str], bool],
    *,
    layers: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
) -> int:
    """The layer whose direction, ablated, leaves the fewest judged refusals on ``pairs`` (ties: the first)."""
    results = {
        layer: judged_refusal(
            loaded, pairs, is_refusal, direction=directions[layer], max_new_tokens=max_new_tokens, batch_size=batch_size
        )[0]
        for layer in layers
    }
    return min(results, key=lambda layer: (results[layer], layer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="recipe:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--langs", default="en")
    parser.add_argument("--n-train", type=int, default=48, help="harmful and harmless fit prompts per language")
    parser.add_argument("--n-check", type=int, default=16, help="select prompts per language for the check")
    parser.add_argument("--target-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ablate-prob", type=float, default=0.75)
    parser.add_argument("--judge", default="substring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists: choose a new folder")
    judge = make_judge(args.judge)
    if judge is None:
        raise SystemExit("--judge score cannot judge completions here: use substring or model:PATH")

    def is_refusal(text: str, lang: str) -> bool:
        return bool(judge.judge([text], [lang])[0])

    langs = parse_languages(args.langs)
    loaded = load_model(args.model, ModelLoadOptions(dtype="float32"))
    config = json.loads((Path(loaded.source.folder) / "config.json").read_text(encoding="utf-8"))
    stored_dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))
    started = time.perf_counter()

    def pairs(kind: str, role: str, n: int) -> list[tuple[str, str]]:
        return [(lang, t) for lang in langs for t in role_prompts(None, kind, lang, role).texts[:n]]  # type: ignore[arg-type]

    fit_bad, fit_good = pairs("harmful", "fit", args.n_train), pairs("harmless", "fit", args.n_train)
    check = pairs("harmful", "select", args.n_check)
    directions = layer_directions(loaded, [t for _, t in fit_bad], [t for _, t in fit_good], args.batch_size)
    n_layers = directions.shape[0]
    probe_layers = sorted({round(n_layers * f) for f in (0.4, 0.5, 0.6, 0.7)})
    layer = strongest_layer(
        loaded,
        check,
        directions,
        is_refusal,
        layers=probe_layers,
        max_new_tokens=args.target_tokens,
        batch_size=args.batch_size,
    )
    before = {
        "plain": judged_refusal(loaded, check, is_refusal, direction=None, max_new_tokens=args.target_tokens, batch_size=args.batch_size),
        "ablated": judged_refusal(loaded, check, is_refusal, direction=directions[layer], max_new_tokens=args.target_tokens, batch_size=args.batch_size),
    }  # fmt: skip
    print(f"base: refusal {before['plain']} plain, {before['ablated']} with layer {layer}'s direction ablated")
    examples, counts = make_examples(
        loaded, fit_bad, fit_good, is_refusal=is_refusal, target_tokens=args.target_tokens, batch_size=args.batch_size
    )
    print(f"targets: {counts}")

    def show(step: int, loss: float) -> None:
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}: loss {loss:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    merged, record = train_defence(
        loaded, examples, directions, steps=args.steps, batch_size=args.batch_size, rank=args.rank, lr=args.lr,
        ablate_prob=args.ablate_prob, seed=args.seed, progress=show,
    )  # fmt: skip
    # What is checked is what is saved: the merged weights rounded to the checkpoint's dtype (run in float32).
    merged = merged.to(stored_dtype).to(torch.float32)
    loaded.model = merged
    after = {
        "plain": judged_refusal(loaded, check, is_refusal, direction=None, max_new_tokens=args.target_tokens, batch_size=args.batch_size),
        "ablated": judged_refusal(loaded, check, is_refusal, direction=directions[layer], max_new_tokens=args.target_tokens, batch_size=args.batch_size),
    }  # fmt: skip
    print(f"defended: refusal {after['plain']} plain, {after['ablated']} with layer {layer}'s direction ablated")
    info = {
        "base": loaded.source.public_name,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "targets": counts,
        "losses": record.losses,
        "ablated_steps": sum(record.ablated),
        "train_seconds": round(record.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "check": {"split": "select", "layer": layer, "base": before, "defended": after},
    }
    with atomic_output_dir(args.out) as tmp:
        merged.to(stored_dtype).save_pretrained(tmp, max_shard_size="2GB")
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "defended.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({info['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
