"""The evaluator: metrics on known distributions, reports and plots, caching, judges, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.evaluation.report import SCHEMA
from weightedit.evaluation.stats import wilson_interval
from weightedit.prompts import LANGUAGES

from helpers import strip_chat_template
from tiny_models import (
    make_config,
    make_planted_model,
    make_tokenizer,
    planted_prompts,
    random_direction,
    write_planted_prompts,
)

R_TRUE = random_direction(seed=5)
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "src" / "weightedit" / "evaluation" / "report.schema.json"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = make_planted_model(root / "base", R_TRUE)
    edited = orthogonalize_checkpoint(base, root / "edited", R_TRUE, progress=False).out
    prompts = write_planted_prompts(root / "prompts.jsonl", n_train=8, n_val=8, langs=("en", "de"))
    ppl = root / "ppl"
    ppl.mkdir()
    for lang, seed in (("en", 3), ("de", 4)):
        rows = [{"text": t} for t in planted_prompts(6, False, seed)]
        (ppl / f"{lang}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return base, edited, prompts, ppl


def run_evaluate(models, out, *extra):
    base, edited, prompts, ppl = models
    args = [
        "evaluate",
        "--model",
        str(edited),
        "--baseline",
        str(base),
        "--langs",
        "en,de",
        "--prompts",
        str(prompts),
        "--limit",
        "8",
        "--ppl-data",
        str(ppl),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    return CliRunner().invoke(app, args)


def test_report_before_and_after_the_edit(models, tmp_path):
    out = tmp_path / "report"
    # The planted model's "refusal" is the token REFUSE, which no phrase list knows: judge by score.
    result = run_evaluate(models, out, "--generate", "3", "--judge", "score")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["schema"] == SCHEMA
    for lang in ("en", "de"):
        v = report["languages"][lang]
        assert v["baseline"]["refusal_rate_score"] == 1.0  # the planted model refuses every harmful prompt
        assert v["edited"]["refusal_rate_score"] == 0.0  # and never after the direction is removed
        assert v["baseline"]["overrefusal_rate_score"] == 0.0
        assert v["baseline"]["refusal_tokens"] == ["REFUSE"]
        assert 0 <= v["edited"]["kl_mean"] < 0.5
        assert v["baseline"]["kl_mean"] is None
        assert v["edited"]["n_generated"] == 3 and v["edited"]["judge_score_agreement"] is not None
        assert 0.5 < v["perplexity_ratio"] < 2
        assert len(v["samples"]) == 3 and v["samples"][0]["baseline"].startswith("REFUSE")
        assert v["judged_refusals"] == []  # the edited model refuses none
        # Every rate carries its n and Wilson interval; KL and the perplexity ratio a bootstrap interval.
        for side, rate in (("baseline", 1.0), ("edited", 0.0)):
            m = v[side]
            assert m["refusal_method"] == "judge" and (m["refusal_k"], m["refusal_n"]) == (round(3 * rate), 3)
            assert m["refusal_ci"] == pytest.approx(list(wilson_interval(round(3 * rate), 3)))
            assert m["refusal_ci_score"] == pytest.approx(list(wilson_interval(round(8 * rate), 8)))
        kl_lo, kl_hi = v["edited"]["kl_ci"]
        assert kl_lo <= v["edited"]["kl_mean"] <= kl_hi and v["edited"]["n_kl"] == 8
        lo, hi = v["perplexity_ratio_ci"]
        assert lo <= v["perplexity_ratio"] <= hi
        test = v["refusal_mcnemar"]
        assert (test["only_before"], test["only_after"], test["method"]) == (3, 0, "exact")
        assert test["p_value"] == pytest.approx(0.25)  # 3 discordant pairs, all one way: 2 / 2^3
    assert report["split"] == "test split, held out from direction selection"
    assert report["judge"]["name"] == "score" and report["judge"]["accuracy"] is None
    summary = report["summary"]
    assert summary["refusal_baseline_pooled"]["n"] == 6 and summary["refusal_baseline_pooled"]["k"] == 6
    assert summary["bars_met"]["reduction"] is True
    assert summary["languages_meeting_reduction_bar"] == ["de", "en"]
    for name in ("refusal.png", "perplexity_ratio.png"):
        assert (out / name).stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| English (en) | 3 | 100% [44–100%] (3/3) | 0% [0–56%] (0/3) | 0.25 |" in md, md
    assert (
        "Split: **test split, held out from direction selection**" in md
        and "Wilson 95% interval" in md
        and "refusal.png" in md
    )
    assert str(models[0].parent) not in md  # no local paths in the report ...
    assert str(models[0].parent) not in (out / "report.json").read_text()  # ... nor in report.json (it is published)


def test_default_headline_rates_come_from_judged_generations(models, tmp_path):
    """Without --generate every evaluated prompt, harmful and harmless, is completed and judged; the judged
    shares are the headline rates. --generate 0 falls back to first-token scores and the report says so."""
    out = tmp_path / "default"
    result = run_evaluate(models, out, "--judge", "score")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["options"]["generate"] == 8 and report["options"]["max_new_tokens"] == 96
    for v in report["languages"].values():
        for side in ("baseline", "edited"):
            m = v[side]
            assert m["refusal_method"] == "judge" and m["refusal_n"] == 8 and m["n_generated"] == 8
            assert m["overrefusal_method"] == "judge" and m["overrefusal_n"] == 8 == m["n_overrefusal_judged"]
        assert (v["baseline"]["refusal_k"], v["edited"]["refusal_k"]) == (8, 0)
    md = (out / "report.md").read_text()
    assert "whose greedy generation the judge counts as a refusal" in md

    quick = tmp_path / "quick"
    result = run_evaluate(models, quick, "--generate", "0", "--generate-harmless", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((quick / "report.json").read_text())
    for v in report["languages"].values():
        assert v["edited"]["refusal_method"] == "score" and v["edited"]["n_generated"] == 0
        # Over-refusal is a rate a user reads: without judged generations it is not measured (the score-based
        # share stays a secondary field).
        assert v["edited"]["overrefusal_method"] is None and v["edited"]["overrefusal_rate"] is None
        assert v["edited"]["overrefusal_rate_score"] is not None
    md = (quick / "report.md").read_text()
    assert "no generations were judged" in md and "Over-refusal = not measured" in md


def test_judged_report_carries_the_judges_measured_quality(models, tmp_path):
    out = tmp_path / "report"
    result = run_evaluate(models, out, "--generate", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    judge = report["judge"]
    assert judge["name"] == "substring" and judge["n"] == 168 and 0.8 <= judge["accuracy"] <= 1
    assert set(judge["per_language"]) == set(LANGUAGES) and judge["development"]["n"] >= 280
    assert "held-out labelled responses: accuracy" in (out / "report.md").read_text()


def test_second_run_reuses_the_cached_baseline(models, tmp_path):
    first = run_evaluate(models, tmp_path / "a")
    second = run_evaluate(models, tmp_path / "b")
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    r1 = json.loads((tmp_path / "a" / "report.json").read_text())
    r2 = json.loads((tmp_path / "b" / "report.json").read_text())
    assert r2["cache"]["baseline_languages_from_cache"] == ["en", "de"]
    assert r2["timings_s"]["baseline_load"] == 0  # the baseline model was not even loaded
    assert r1["languages"]["en"]["baseline"] == r2["languages"]["en"]["baseline"]
    third = run_evaluate(models, tmp_path / "c", "--no-cache")
    assert third.exit_code == 0
    r3 = json.loads((tmp_path / "c" / "report.json").read_text())
    assert r3["cache"]["baseline_languages_from_cache"] == []


def test_evaluate_without_baseline_and_with_comparison(models, tmp_path):
    base, _, prompts, _ = models
    cmp_dir = tmp_path / "cmp"
    res = CliRunner().invoke(
        app,
        [
            "compare-directions",
            "--model",
            str(base),
            "--langs",
            "en,de",
            "--prompts",
            str(prompts),
            "--n-train",
            "8",
            "--n-val",
            "8",
            "--top-k",
            "1",
            "--out",
            str(cmp_dir),
            "--check-generations",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "single"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(base),
            "--langs",
            "en,de",
            "--prompts",
            str(prompts),
            "--limit",
            "8",
            "--comparison",
            str(cmp_dir),
            "--out",
            str(out),
            "--judge",
            "score",  # the planted model's refusal is the token REFUSE, which no phrase list knows
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["models"]["baseline"] is None
    # The unedited planted model refuses: every judged refusal is listed with its prompt and completion.
    for v in report["languages"].values():
        refusals = v["judged_refusals"]
        assert len(refusals) == v["edited"]["refusal_k"] > 0
        assert all(r["edited"].startswith("REFUSE") and r["prompt"] for r in refusals)
        assert sorted({r["index"] for r in refusals}) == [r["index"] for r in refusals]
    assert (out / "cosine.png").stat().st_size > 10_000 and (out / "transfer.png").stat().st_size > 10_000


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tmp_path):
    from weightedit.evaluation.metrics import perplexity, token_nll
    from weightedit.runtime.modeling import load_model

    tokenizer = make_tokenizer()
    model = AutoModelForCausalLM.from_config(make_config("llama", vocab_size=len(tokenizer)))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next-token distribution is uniform
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", progress=False)
    nll, count = token_nll(loaded, planted_prompts(5, False, 1), batch_size=2)
    assert count > 10
    assert perplexity(nll, count) == pytest.approx(len(tokenizer), rel=1e-4)
    assert nll / count == pytest.approx(math.log(len(tokenizer)), rel=1e-5)


def test_model_judge_plumbing(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from weightedit.evaluation.judges import make_judge

    tokenizer = make_tokenizer()
    for label, expected in ((1, True), (0, False)):
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            id2label={0: "compliance", 1: "refusal"},
            label2id={"compliance": 0, "refusal": 1},
        )
        model = BertForSequenceClassification(config)
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([0.0, 0.0]))
            model.classifier.bias[label] = 10.0
        folder = tmp_path / f"judge{label}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        judge = make_judge(f"model:{folder}")
        assert judge.judge(["word1 word2", "bad1 word3"], ["en", "en"]) == [expected, expected]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--langs", "en,xx"], "available languages are"),
        (["--judge", "oracle"], "unknown --judge"),
        (["--split", "nope"], "unknown --split"),
    ],
)
def test_bad_input(models, tmp_path, extra, message):
    base, edited, prompts, _ = models
    args = [
        "evaluate",
        "--model",
        str(edited),
        "--baseline",
        str(base),
        "--langs",
        "en",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "r"),
        *extra,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_baseline_with_another_tokenizer_is_refused(models, tmp_path):
    base, edited, prompts, _ = models
    from tiny_models import make_model, save_model

    other = save_model(make_model("llama"), tmp_path / "other")
    tok = make_tokenizer()
    tok.add_tokens(["extra1", "extra2"])
    tok.save_pretrained(other)
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(edited),
            "--baseline",
            str(other),
            "--langs",
            "en",
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 2 and "different tokenizer" in res.output, res.output


def test_output_below_a_file(models, tmp_path):
    base, edited, prompts, _ = models
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(edited), "--langs", "en", "--prompts", str(prompts), "--out", str(blocker / "sub")],
    )
    assert res.exit_code == 2 and "which is a file, not a folder" in res.output, res.output
    assert blocker.read_text() == "x"


def test_empty_prompt_source(models, tmp_path):
    base, edited, _, _ = models
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "word1", "lang": "en", "kind": "harmless"}) + "\n")
    res = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(edited), "--langs", "en", "--prompts", str(empty), "--out", str(tmp_path / "r")],
    )
    assert res.exit_code == 2 and "no harmful prompts" in res.output, res.output


def test_chat_template_option_for_models_without_one(models, tmp_path):
    """A model without a chat template: a clear error naming --chat-template, which then makes it work."""
    base, _, prompts, _ = models
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    strip_chat_template(bare)
    args = ["evaluate", "--model", bare, "--langs", "en", "--prompts", prompts, "--limit", "4", "--quiet"]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "r1"]])
    assert res.exit_code == 2 and "--chat-template" in res.output, res.output
    template = tmp_path / "t.jinja"
    template.write_text(make_tokenizer().chat_template)
    res = CliRunner().invoke(
        app, [str(a) for a in [*args, "--out", tmp_path / "r2", "--chat-template", template, "--no-cache"]]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert report["languages"]["en"]["edited"]["refusal_score_mean"] is not None


def test_hedged_refusals_are_counted_and_marked_apart(tmp_path):
    from weightedit.evaluation.report import build_report, markdown, write_report
    from weightedit.evaluation.runner import EvalOptions, LanguageRun, ModelRun

    from report_fixtures import TOKENS

    completions = [
        "I can't give a specific way, because it depends on your setup, but here are some tools:\n1. A file",
        "I'm sorry, but I can't help with that.",
        "Sure, here is how:\n1. Open the panel.",
    ]

    def run(generations: list[str]) -> LanguageRun:
        return LanguageRun(
            lang="en",
            tokens=TOKENS,
            harmful_scores=[1.0] * 3,
            harmless_scores=[-1.0] * 3,
            nll=30.0,
            nll_tokens=10,
            harmful_generations=generations,
            kl=[0.01] * 3,
        )

    baseline = ModelRun("base", "1" * 16, "/models/base", {"en": run(["I'm sorry, but I can't."] * 3)}, {})
    edited = ModelRun("edited", "0" * 16, "/models/edited", {"en": run(completions)}, {})
    prompts = {"en": ["p0", "p1", "p2"]}
    report = build_report(
        edited, baseline, EvalOptions(langs=("en",), limit=3, generate=3), timings={}, prompts=prompts
    )
    write_report(report, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    en = report["languages"]["en"]
    # The hedge is a refusal (2 of 3), marked as a hedge; the rate with it read as an answer is shown apart.
    assert en["edited"]["refusal_k"] == 2
    assert [(r["index"], r["hedge"]) for r in en["judged_refusals"]] == [(0, True), (1, False)]
    text = (tmp_path / "report.md").read_text()
    assert "## Refusals that are hedged declines" in text and "| en | 1 of 2 | 0 | " in text and "(1/3)" in text
    # The score judge does not tell hedges: no marks, no section.
    report = build_report(
        edited, baseline, EvalOptions(langs=("en",), limit=3, generate=3, judge="score"), timings={}, prompts=prompts
    )
    assert all("hedge" not in r for r in report["languages"]["en"]["judged_refusals"])
    assert "hedged declines" not in markdown(report, {})
