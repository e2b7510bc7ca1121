"""Direction computation: planted-direction recovery, chat-template positions, scoring math, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.direction.selection import SelectionOptions, compute_direction
from weightedit.edit.direction_file import load_direction
from weightedit.errors import ChatTemplateError
from weightedit.runtime.modeling import load_model, post_instruction_length
from weightedit.runtime.options import ModelLoadOptions
from weightedit.runtime.scoring import derive_refusal_tokens, kl_divergence, refusal_scores

from helpers import PrefixJudge, strip_chat_template
from tiny_models import (
    TRIGGERS,
    make_planted_model,
    make_tokenizer,
    planted_prompts,
    random_direction,
    write_planted_prompts,
)

R_TRUE = random_direction(seed=5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    model = make_planted_model(root / "model", R_TRUE)
    prompts = write_planted_prompts(root / "prompts.jsonl")
    return model, prompts


@pytest.mark.parametrize("search", ["fast", "thorough"])
def test_selection_recovers_the_planted_direction(planted, search):
    model, prompts = planted
    loaded = load_model(model, progress=False)
    result = compute_direction(
        loaded,
        ["en"],
        SelectionOptions(n_train=24, n_val=8, prompts=str(prompts), search=search, top_k=3),
        judge=PrefixJudge(),
        progress=False,
    )
    cosine = float(result.direction.vector @ R_TRUE)
    assert cosine >= 0.99, f"selected direction has cosine {cosine:.4f} with the planted one"
    assert result.refusal_tokens["en"].tokens == ("REFUSE",)
    chosen = result.chosen
    assert chosen.passes_filters and chosen.bypass < 0 < chosen.induce and chosen.kl <= 0.1
    assert result.baseline["harmful_refusal_score"] > 0 > result.baseline["harmless_refusal_score"]
    assert result.direction.candidates.shape == (loaded.n_layers, loaded.n_post, loaded.d_model)


def test_capture_mean_difference_is_along_the_planted_direction(planted):
    from weightedit.runtime.activations import capture_means

    model, _ = planted
    loaded = load_model(model, progress=False)
    harmful = capture_means(loaded, loaded.format(planted_prompts(16, True, 7)), batch_size=5)
    harmless = capture_means(loaded, loaded.format(planted_prompts(16, False, 7)), batch_size=3)
    diff = harmful.means - harmless.means
    # Layer 0 sees only the template tokens at the post-instruction positions: no difference there.
    assert diff[0].abs().max() < 1e-5
    for layer in (1, 2):
        for pos in range(loaded.n_post):
            v = diff[layer, pos].float()
            assert float(v @ R_TRUE) / float(v.norm()) > 0.99


def test_batch_size_and_padding_do_not_change_the_means(planted):
    from weightedit.runtime.activations import capture_means

    model, _ = planted
    loaded = load_model(model, progress=False)
    texts = loaded.format(planted_prompts(9, True, 11))
    one = capture_means(loaded, texts, batch_size=1)
    many = capture_means(loaded, texts, batch_size=4)
    assert torch.allclose(one.means, many.means, atol=1e-4)
    assert torch.allclose(one.probs, many.probs, atol=1e-5)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # ChatML (Qwen, SmolLM2): <|end|> \n <|assistant|> \n
        (
            "{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
            2,
        ),
        # Llama-3 style header with a system turn in front
        (
            "<s> <|user|> word1 <|end|> {% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> OK <|end|>{% endif %}",
            4,
        ),
        # Mistral style: only a closing marker after the instruction
        ("{% for m in messages %}<s> <|user|> {{ m['content'] }} <|assistant|>{% endfor %}", 1),
        # Gemma style: end of turn, then the model header and a word
        ("{% for m in messages %}<|user|> {{ m['content'] }} <|end|> <|assistant|> word2{% endfor %}", 3),
    ],
)
def test_post_instruction_positions_for_several_templates(template, expected):
    tokenizer = make_tokenizer(template)
    assert post_instruction_length(tokenizer) == expected


def test_template_without_post_instruction_tokens_is_refused():
    tokenizer = make_tokenizer("{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="no tokens after"):
        post_instruction_length(tokenizer)


def test_model_without_chat_template_is_a_clear_error(planted, tmp_path):
    import shutil

    model, _ = planted
    copy = tmp_path / "base"
    shutil.copytree(model, copy)
    strip_chat_template(copy)
    with pytest.raises(ChatTemplateError, match="chat_template"):
        load_model(copy, progress=False)
    template = tmp_path / "t.jinja"
    template.write_text(make_tokenizer().chat_template)
    loaded = load_model(copy, ModelLoadOptions(chat_template=template), progress=False)
    assert loaded.n_post == 2


def test_refusal_score_and_kl_on_known_distributions():
    vocab = 10
    uniform = torch.full((1, vocab), -torch.log(torch.tensor(float(vocab))))
    # Two refusal tokens out of ten under a uniform distribution: log(0.2 / 0.8).
    assert refusal_scores(uniform, [1, 2]).item() == pytest.approx(torch.log(torch.tensor(0.25)).item(), abs=1e-6)
    assert kl_divergence(uniform, uniform).item() == pytest.approx(0.0, abs=1e-7)
    peaked = torch.log_softmax(torch.tensor([[5.0] + [0.0] * (vocab - 1)]), -1)
    expected = float((peaked.exp() * (peaked - uniform)).sum())
    assert kl_divergence(peaked, uniform).item() == pytest.approx(expected, rel=1e-5)
    # Saturated probabilities still give finite, ordered scores.
    sure = torch.log_softmax(torch.tensor([[60.0, 0.0, 0.0]]), -1)
    assert torch.isfinite(refusal_scores(sure, [0])).all() and refusal_scores(sure, [0]).item() > 50


def test_refusal_tokens_are_the_ones_far_more_likely_after_harmful_prompts():
    harmful = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)
    harmless = torch.tensor([0.01, 0.02, 0.47, 0.5], dtype=torch.float64)
    tokens = derive_refusal_tokens(harmful, harmless)
    assert tokens.ids == (0, 1)
    assert tokens.harmful_mass == pytest.approx(0.8) and tokens.harmless_mass == pytest.approx(0.03)


def test_direction_cli_writes_file_with_metadata(planted, tmp_path):
    model, prompts = planted
    out = tmp_path / "r.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "direction",
            "--model",
            str(model),
            "--lang",
            "en",
            "--prompts",
            str(prompts),
            "--n-train",
            "24",
            "--n-val",
            "8",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--check-generations",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    d = load_direction(out)
    assert d.layer == 1 and d.position in (-1, -2) and d.languages == ("en",)
    assert d.config_hash and d.meta["n_harmful"] == 24
    assert float(d.vector @ R_TRUE) > 0.99
    scores = json.loads(out.with_name("r.scores.json").read_text())
    assert scores["refusal_tokens"]["en"]["tokens"] == ["REFUSE"]
    assert any(c["bypass"] is not None for c in scores["candidates"])
    # The direction file refuses to edit a different model.
    other = tmp_path / "other"
    from tiny_models import make_model, save_model

    save_model(make_model("llama"), other)
    res = CliRunner().invoke(
        app, ["orthogonalize", "--model", str(other), "--direction", str(out), "--out", str(tmp_path / "x"), "--quiet"]
    )
    assert res.exit_code == 2 and "computed on" in res.output


def test_orthogonalize_by_language_removes_the_planted_refusal(planted, tmp_path):
    from weightedit.runtime.activations import last_logprobs

    model, prompts = planted
    out = tmp_path / "edited"
    result = CliRunner().invoke(
        app,
        [
            "orthogonalize",
            "--model",
            str(model),
            "--direction-lang",
            "en",
            "--prompts",
            str(prompts),
            "--n-train",
            "24",
            "--n-val",
            "8",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--check-generations",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "weightedit" / "refusal_direction.safetensors").exists()
    assert (out / "weightedit" / "refusal_direction.scores.json").exists()
    # No weights-like file at the top level: a server loading every *.safetensors would take it for weights.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in model.glob("*.safetensors"))
    before, after = load_model(model, progress=False), load_model(out, progress=False)
    texts = before.format(planted_prompts(8, True, 99))
    refuse = before.tokenizer.convert_tokens_to_ids("REFUSE")
    p_before = last_logprobs(before, texts)[:, refuse].exp()
    p_after = last_logprobs(after, texts)[:, refuse].exp()
    assert p_before.min() > 0.9 and p_after.max() < 0.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lang", "xx"], "available languages are"),
        (["--n-train", "500"], "too few prompts"),
    ],
)
def test_direction_bad_input(planted, tmp_path, args, message):
    model, prompts = planted
    result = CliRunner().invoke(
        app,
        [
            "direction",
            "--model",
            str(model),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "r.safetensors"),
            *args,
        ],
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "r.safetensors").exists()


def test_triggers_are_in_the_vocabulary():
    tokenizer = make_tokenizer()
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.pad_token_id for t in TRIGGERS)


def test_compare_directions_on_the_planted_model(planted, tmp_path):
    model, _ = planted
    prompts = write_planted_prompts(tmp_path / "multi.jsonl", langs=("en", "de", "fr"))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        [
            "compare-directions",
            "--model",
            str(model),
            "--langs",
            "en,de,fr",
            "--prompts",
            str(prompts),
            "--n-train",
            "24",
            "--n-val",
            "8",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--check-generations",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    cosine = torch.tensor(data["cosine"])
    assert cosine.min() > 0.99  # the same mechanism in every "language"
    baseline = torch.tensor(data["baseline_refusal_score"])
    transfer = torch.tensor(data["transfer_refusal_score"])
    assert (baseline > 3).all() and (transfer < 0).all()  # any language's direction removes refusal everywhere
    for name in ("cosine.png", "transfer.png"):
        assert (out / name).stat().st_size > 10_000
    from safetensors.torch import load_file

    assert set(load_file(str(out / "directions.safetensors"))) == {"en", "de", "fr"}
