"""Error messages in the CLI's terms: library errors carry fields, this module names the flags."""

from __future__ import annotations

from weightedit.errors import (
    FilterFailedDirectionError,
    NotRefusingError,
    OptionsError,
    SelectionError,
    WeighteditError,
)

# Library option names -> the flags that set them.
FLAGS = {
    "search": "--search",
    "n_train": "--n-train",
    "n_val": "--n-val",
    "batch_size": "--batch-size",
    "top_k": "--top-k",
    "prescreen_prompts": "--prescreen-prompts",
    "check_generations": "--check-generations",
    "check_tokens": "--check-tokens",
    "max_layer_fraction": "the layer limit (0.8 of the depth)",
    "kl_threshold": "--max-kl",
    "position": "--position",
    "layer/position": "--layer/--position",
    "tied_embeddings": "--tied-embeddings",
    "dtype": "--dtype",
    "split": "--split",
    "limit": "--limit",
    "generate": "--generate",
    "generate_harmless": "--generate-harmless",
    "max_new_tokens": "--max-new-tokens",
    "ppl_limit": "--ppl-limit",
    "mgsm_limit": "--mgsm-limit",
    "threshold": "--threshold",
    "attack_candidates": "--attack-candidates",
    "min_refusal": "--min-refusal",
}


def cli_message(error: WeighteditError) -> str:
    """The one line the CLI prints for ``error``."""
    if isinstance(error, SelectionError):
        return (
            f"no candidate direction passes the KL filter (KL ≤ {error.max_kl}; {error.scored} scored exactly); best "
            f"by bypass: {'; '.join(error.candidates)}: relax it with --max-kl, keep the best anyway with "
            "--allow-failing-filters, or search further with --search thorough or more prompts (--n-train, --n-val)"
        )
    if isinstance(error, NotRefusingError):
        return (
            f"the model does not refuse in {error.lang}: {error.reason}; there is no refusal direction to find there: "
            "choose a language it refuses in, or pass --allow-non-refusing"
        )
    if isinstance(error, FilterFailedDirectionError):
        return (
            f"{error.source} failed its KL filter at selection (KL {error.kl} > {error.max_kl}): an edit with it "
            "damages ordinary answers; choose another direction, or pass --allow-failing-filters to write it anyway"
        )
    if isinstance(error, OptionsError):
        flag = FLAGS.get(error.option, error.option)
        return f"{flag} {error.value}: {error.problem}"
    return str(error)
