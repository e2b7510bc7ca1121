"""Direction selection never ships a broken model: filters, fallbacks, non-refusing languages, every family."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.direction import search as search_module
from weightedit.direction.search import SearchContext
from weightedit.direction.selection import SelectionOptions, compute_direction, rank_correlation, refusal_tokens_for
from weightedit.edit.direction_file import Direction, load_direction
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.errors import ChatTemplateError, NotRefusingError, OptionsError
from weightedit.runtime.hooks import ablate_as_edit
from weightedit.runtime.modeling import format_chat, load_model, post_instruction_length

from helpers import PrefixJudge
from tiny_models import (
    FAMILY_CONFIGS,
    make_model,
    make_planted_model,
    make_tokenizer,
    planted_prompts,
    random_direction,
    save_model,
    write_planted_prompts,
)

R_TRUE = random_direction(seed=5)


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection-planted")
    return make_planted_model(root / "model", R_TRUE), write_planted_prompts(root / "prompts.jsonl")


@pytest.fixture(scope="module")
def silent_prompts(tmp_path_factory):
    """Prompts for the planted model without trigger words: "harmful" ones it answers like harmless ones."""
    path = tmp_path_factory.mktemp("silent") / "prompts.jsonl"
    rows = []
    for kind, seed in (("harmful", 11), ("harmless", 1)):
        for split, n in (("train", 24), ("val", 8), ("test", 8)):
            for i, text in enumerate(planted_prompts(n, False, seed + 100 * len(split))):
                rows.append(
                    {"id": f"{kind}-{split}-{i}", "lang": "en", "kind": kind, "split": split, "instruction": text}
                )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def direction_args(model, prompts, out, *extra):
    return (
        "direction",
        "--model",
        model,
        "--prompts",
        prompts,
        "--n-train",
        "24",
        "--n-val",
        "8",
        "--top-k",
        "2",
        "--out",
        out,
        "--quiet",
        *extra,
    )


def test_every_candidate_failing_the_kl_filter_is_an_error_and_writes_nothing(planted, tmp_path):
    model, prompts = planted
    out = tmp_path / "r.safetensors"
    result = run(*direction_args(model, prompts, out, "--check-generations", "0", "--max-kl", "1e-9"))
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "no candidate direction passes the KL filter" in line
    import re

    scored = int(re.search(r"(\d+) scored exactly", line).group(1))
    # The best three (here: every candidate of the 3-layer model below 0.8·L), with layer, position, bypass, KL.
    assert len(re.findall(r"layer \d+ position -\d+ \(bypass -?[\d.]+, KL [\d.]+\)", line)) == min(3, scored)
    for option in ("--max-kl", "--allow-failing-filters", "--search thorough", "--n-train"):
        assert option in line
    assert not list(tmp_path.iterdir())


def test_allowed_filter_failure_is_recorded_and_the_edit_needs_the_same_permission(planted, tmp_path):
    model, prompts = planted
    out = tmp_path / "r.safetensors"
    result = run(
        *direction_args(model, prompts, out, "--check-generations", "0", "--max-kl", "1e-9", "--allow-failing-filters")
    )
    assert result.exit_code == 0, result.output
    d = load_direction(out)
    assert d.meta["selection"]["status"] == "failed-filters" and d.meta["selection"]["kl_filter_passed"] is False
    scores = json.loads(out.with_name("r.scores.json").read_text())
    assert scores["status"] == "failed-filters" and "KL filter" in scores["note"]

    edited = tmp_path / "edited"
    refused = run("orthogonalize", "--model", model, "--direction", out, "--out", edited, "--quiet")
    assert refused.exit_code == 2 and "failed its KL filter" in refused.output
    assert not edited.exists()
    accepted = run(
        "orthogonalize", "--model", model, "--direction", out, "--out", edited, "--allow-failing-filters", "--quiet"
    )
    assert accepted.exit_code == 0, accepted.output
    provenance = json.loads((edited / "weightedit.json").read_text())
    assert provenance["options"]["allow_failing_filters"] is True
    assert provenance["direction"]["selection"]["status"] == "failed-filters"


def test_model_that_does_not_refuse_is_reported_and_nothing_is_chosen(planted, silent_prompts, tmp_path):
    model, _ = planted
    out = tmp_path / "r.safetensors"
    result = run(*direction_args(model, silent_prompts, out, "--check-generations", "0"))
    assert result.exit_code == 2
    assert "does not refuse in en" in result.output and "--allow-non-refusing" in result.output
    assert not out.exists()


def test_refusal_tokens_are_checked_against_judged_generations(planted, tmp_path):
    """The planted model's first token contrasts, but its "refusal" is a token no judge knows: with the
    default check (substring judge on greedy completions of train prompts) it counts as not refusing."""
    model, prompts = planted
    result = run(*direction_args(model, prompts, tmp_path / "r.safetensors"))
    assert result.exit_code == 2
    assert "0 of 8 greedy completions" in " ".join(result.output.split())
    loaded = load_model(model, progress=False)
    chosen = compute_direction(
        loaded, ["en"], SelectionOptions(n_train=24, n_val=8, prompts=str(prompts), top_k=2), judge=PrefixJudge()
    )
    tokens = chosen.refusal_tokens["en"]
    assert tokens.refuses and tokens.judged == tokens.generated == 8


def test_fast_search_records_its_work_and_finds_the_planted_direction(planted):
    model, prompts = planted
    loaded = load_model(model, progress=False)
    options = SelectionOptions(n_train=24, n_val=8, prompts=str(prompts), top_k=2, check_generations=0)
    fast = compute_direction(loaded, ["en"], options, progress=False)
    thorough = compute_direction(
        loaded, ["en"], SelectionOptions(**{**options.__dict__, "search": "thorough"}), progress=False
    )
    assert (fast.chosen.layer, fast.chosen.position) == (thorough.chosen.layer, thorough.chosen.position)
    assert fast.status == "passed" and float(fast.direction.vector @ R_TRUE) > 0.99
    search = fast.search
    assert search["strategy"] == "fast" and search["prescreened"] == len([s for s in fast.scores])
    assert 1 <= search["scored"] <= search["prescreened"]
    rho = search["spearman_prescreen_vs_exact"]
    assert rho is None or -1 <= rho <= 1
    assert "prompt_filter" in fast.baseline and fast.direction.meta["prompt_splits"]["en"]["select"] == "val split"


def test_without_require_induce_the_kl_filter_alone_decides(planted, tmp_path):
    """On a model whose refusal direction was already removed (what an attack meets on an edited or defended
    model) no candidate induces refusal any more: with the induce filter the choice is a ``kl-only`` fallback;
    without it (what attacks use) the lowest bypass within the KL filter passes, and no induce score is spent."""
    model, prompts = planted
    edited = tmp_path / "edited"
    orthogonalize_checkpoint(model, edited, Direction(vector=R_TRUE), progress=False)
    loaded = load_model(edited, progress=False)
    options = SelectionOptions(
        n_train=24,
        n_val=8,
        prompts=str(prompts),
        search="thorough",
        check_generations=0,
        allow_failing_filters=True,
        allow_non_refusing=True,
    )
    with_induce = compute_direction(loaded, ["en"], options, progress=False)
    assert with_induce.status == "kl-only" and not any(s.passes_filters for s in with_induce.scores)
    without = compute_direction(
        loaded, ["en"], SelectionOptions(**{**options.__dict__, "require_induce": False}), progress=False
    )
    assert without.status == "passed" and all(s.induce is None for s in without.scores)
    within_kl = [s for s in without.scores if s.kl is not None and s.kl <= options.kl_threshold]
    assert within_kl and all(s.passes_filters for s in within_kl)
    assert without.chosen.bypass == min(s.bypass for s in within_kl)
    assert without.direction.meta["selection"]["filters"]["induce"] == "not required"
    assert with_induce.direction.meta["selection"]["filters"]["induce"] == "> 0"


def test_without_require_induce_the_fast_search_stops_early_where_no_candidate_induces(monkeypatch):
    """The fast search's bound needs a candidate that passes the filters. Where none induces refusal (an edited or
    defended model) it scores every candidate with the induce filter, and stops after a few without it. The
    model's passes are replaced by a table (bypass rising along the grid, low KL, no candidate inducing)."""

    class TableContext(SearchContext):
        def ablated(self, layer, p, n=None):
            return float(4 * layer + p), 0.01

        def induce(self, layer, p):
            return -1.0

    monkeypatch.setattr(
        search_module, "ablation_screen", lambda *args, **kwargs: torch.zeros(8, 8, dtype=torch.float64)
    )
    grid = [(layer, p) for layer in range(5) for p in range(4)]
    scored = {}
    for require in (True, False):
        options = SelectionOptions(top_k=2, require_induce=require)
        ctx = TableContext(
            loaded=None,
            options=options,
            candidates=torch.randn(5, 4, 8),
            tokens=SimpleNamespace(ids=[0]),
            harmful_val=["h"] * 4,
            harmless_val=["s"] * 4,
            harmless_lp=torch.zeros(4, 3),
            base_harmful=30.0,
            base_harmless=-1.0,
        )
        result = search_module.search_fast(ctx, grid, progress=False)
        assert result["prescreened"] == len(grid)
        scored[require] = result["scored"]
        exact = [s for s in ctx.scores.values() if s.bypass is not None]
        assert all((s.passes_filters is True) != require for s in exact)
    assert scored[True] == len(grid) and scored[False] == 2


def test_options_are_checked_in_the_library():
    with pytest.raises(OptionsError, match="search"):
        SelectionOptions(search="thorough!")
    with pytest.raises(OptionsError, match="kl_threshold"):
        SelectionOptions(kl_threshold=0)
    with pytest.raises(OptionsError, match="position"):
        SelectionOptions(position=3)


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2], [1, 2]) is None


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_direction_search_runs_end_to_end_on_every_family(family, tmp_path):
    """MoE expert outputs ([routed tokens, d]), learned positions and post-norm writers all go through the
    fast search's first-order screen, pre-screen and exact scores."""
    from weightedit.runtime.modeling import LoadedModel
    from weightedit.sources.model import ModelSource

    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = make_model(family, vocab_size=len(tokenizer))
    folder = tmp_path / family
    save_model(model, folder, shards=False)
    # The word-level test tokenizer, not the family's own class (AutoTokenizer would pick that from config.json).
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=ModelSource(folder=folder, given=family, kind="local"),
        dtype=torch.float32,
        n_post=post_instruction_length(tokenizer),
    )
    prompts = write_planted_prompts(tmp_path / "p.jsonl", n_train=6, n_val=4)
    options = SelectionOptions(
        n_train=6,
        n_val=4,
        top_k=2,
        prompts=str(prompts),
        check_generations=0,
        allow_non_refusing=True,
        allow_failing_filters=True,
        prescreen_prompts=2,
        max_layer_fraction=1.0,  # 2-layer models: layer 0's template-token candidates are all zero
    )
    result = compute_direction(loaded, ["en"], options, progress=False)
    assert result.chosen.bypass is not None and result.chosen.kl is not None
    assert all(s.predicted_bypass is not None and s.prescreen_bypass is not None for s in result.scores)


def test_selection_scores_the_edit_of_post_norm_families(tmp_path):
    """For a post-norm family the exact bypass is the refusal score of the edited checkpoint."""
    from weightedit.edit.direction_file import Direction
    from weightedit.edit.rewrite import orthogonalize_checkpoint
    from weightedit.runtime.activations import last_logprobs

    tokenizer = make_tokenizer()
    folder = tmp_path / "gemma2"
    save_model(make_model("gemma2", vocab_size=len(tokenizer)), folder)
    tokenizer.save_pretrained(folder)
    r = random_direction()
    orthogonalize_checkpoint(folder, tmp_path / "edited", Direction(vector=r), progress=False)
    loaded, edited = load_model(folder, progress=False), load_model(tmp_path / "edited", progress=False)
    texts = loaded.format(planted_prompts(5, True, 3))
    with ablate_as_edit(loaded.model, r):
        hooked = last_logprobs(loaded, texts)
    assert (hooked - last_logprobs(edited, texts)).abs().max().item() < 1e-4


THINKING_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> <think> {% if enable_thinking is defined and not enable_thinking %}"
    "</think> {% endif %}{% endif %}"
)
ALWAYS_THINKING_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> <think>{% endif %}"
)


@pytest.mark.parametrize("template", [THINKING_TEMPLATE, ALWAYS_THINKING_TEMPLATE])
def test_thinking_templates_put_the_answer_after_an_empty_think_block(template):
    tokenizer = make_tokenizer(template)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    text = format_chat(tokenizer, "word1 word2")
    assert text.rstrip().endswith("</think>") and text.count("<think>") == 1
    # The post-instruction tokens run to the end of the closed think block.
    assert post_instruction_length(tokenizer) >= 4


def test_a_token_that_opens_every_answer_is_a_template_error():
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    fixed = torch.full((vocab,), 0.02 / (vocab - 1), dtype=torch.float64)
    fixed[5] = 0.98
    with pytest.raises(ChatTemplateError, match="after harmful and"):
        refusal_tokens_for(SimpleNamespace(tokenizer=tokenizer), fixed, fixed.clone())


def test_tied_config_beside_a_stored_head_is_written_untied(tmp_path):
    """config.json says tied, the checkpoint stores lm_head: the edit keeps the stored head and must say so."""
    from weightedit.edit.direction_file import Direction
    from weightedit.edit.rewrite import orthogonalize_checkpoint

    folder = tmp_path / "llama"
    save_model(make_model("llama", tie_word_embeddings=False), folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    r = random_direction()
    orthogonalize_checkpoint(folder, tmp_path / "edited", Direction(vector=r), progress=False)
    assert json.loads((tmp_path / "edited" / "config.json").read_text())["tie_word_embeddings"] is False
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, tie_word_embeddings=False).eval()
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ablate_as_edit(original, r):
        want = original(ids).logits
    assert (want - edited(ids).logits).abs().max().item() < 1e-4


def test_non_refusing_language_error_names_the_language(planted, silent_prompts):
    model, _ = planted
    loaded = load_model(model, progress=False)
    with pytest.raises(NotRefusingError) as info:
        compute_direction(
            loaded, ["en"], SelectionOptions(n_train=24, n_val=8, prompts=str(silent_prompts), check_generations=0)
        )
    assert info.value.lang == "en" and "harmful" in info.value.reason
