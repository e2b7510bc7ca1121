"""weightedit optimize: the study over edit shapes, its resumable journal, the choice, and the exact write."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import weightedit.optimize.study as study_module
from weightedit.cli.main import app
from weightedit.edit.direction_file import load_direction
from weightedit.edit.in_memory import temporarily_edited, untie_embeddings_
from weightedit.edit.profile import EditProfile, LayerKernel
from weightedit.errors import OptionsError
from weightedit.evaluation.stats import wilson_interval
from weightedit.optimize.objective import first_order_anchor, prepare
from weightedit.optimize.options import DirectionScope, OptimizeOptions
from weightedit.optimize.report import markdown
from weightedit.optimize.space import Anchor, EditPoint, direction_vector, fixed_params, params_of, point_from_params
from weightedit.optimize.study import STUDY_FILE, misses, pooled_refusal
from weightedit.runtime.modeling import load_model
from weightedit.runtime.options import ModelLoadOptions
from weightedit.workflows import optimize_model

from tiny_models import make_planted_model, random_direction, write_planted_prompts

R_TRUE = random_direction(seed=7)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize-planted")
    model = make_planted_model(root / "model", R_TRUE)
    prompts = write_planted_prompts(root / "prompts.jsonl", n_train=24, n_val=8, langs=("en", "de"))
    return model, prompts


@pytest.fixture(scope="module")
def mlp_cost_model(tmp_path_factory, planted):
    """The planted model, plus a layer-2 MLP that writes along r on every prompt (four strong hidden units read
    directions orthogonal to r and write r): the refusal path is still the trigger embeddings and the attention that
    spreads them, but removing r from that MLP changes every harmless answer. The right profile edits the attention
    (and/or the embeddings) and leaves the layer-2 MLP alone."""
    folder = tmp_path_factory.mktemp("optimize-mlp-cost") / "model"
    model = AutoModelForCausalLM.from_pretrained(planted[0], dtype=torch.float32)
    u = R_TRUE / R_TRUE.norm()
    off_r = torch.eye(u.numel()) - torch.outer(u, u)
    g = torch.Generator().manual_seed(5)
    mlp = model.model.layers[2].mlp
    with torch.no_grad():
        for j in range(4):
            mlp.gate_proj.weight[j] = off_r @ torch.randn(u.numel(), generator=g) * 3 / u.numel() ** 0.5
            mlp.up_proj.weight[j] = off_r @ torch.randn(u.numel(), generator=g) * 3 / u.numel() ** 0.5
            mlp.down_proj.weight[:, j] += 0.25 * u
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (planted[0] / name).exists():
            (folder / name).write_bytes((planted[0] / name).read_bytes())
    return folder


def options(prompts, **kw):
    base = dict(
        langs=("en", "de"),
        trials=10,
        n_train=16,
        n_score=8,
        prompts=str(prompts),
        judge="score",
        seed=1,
        direction_scope="global",  # most tests here are of the global path; the per-layer ones say so
    )
    return OptimizeOptions(**{**base, **kw})


def stored_study(work: Path) -> optuna.Study:
    """The study as its journal holds it (what a resumed run reads)."""
    return optuna.load_study(
        study_name="weightedit-optimize", storage=JournalStorage(JournalFileBackend(str(work / STUDY_FILE)))
    )


def trial_and_written(model: Path, out: Path) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The unedited model as the trials hold it (untied), the written checkpoint, and token ids to compare on."""
    trial_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    untie_embeddings_(trial_model)
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, written.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    return trial_model, written, ids


def test_study_chooses_a_point_that_removes_refusal_and_writes_it_exactly(planted, tmp_path):
    model, prompts = planted
    out = tmp_path / "edited"
    job = optimize_model(str(model), out, options(prompts), progress=False)
    study = job.study
    # The first trial is the plain full edit, so the front can never be worse than it.
    first = study.trials[0].point.profile
    assert first.is_full
    assert study.front and all(t.number in {s.number for s in study.trials} for t in study.front)
    chosen = study.chosen
    assert chosen is not None and chosen.meets_target
    assert all(v["k"] == 0 for v in chosen.judged.values())
    assert all(v["k"] > 0 for v in study.baseline_judged.values())

    # The written checkpoint computes what the trial's in-memory model computed.
    direction = load_direction(out / "weightedit" / "refusal_direction.safetensors")
    assert direction.profile == chosen.trial.point.profile
    trial_model, written, ids = trial_and_written(model, out)
    with torch.inference_mode():
        original = trial_model(ids).logits
        with temporarily_edited(trial_model, study.direction(chosen.trial.point), chosen.trial.point.profile):
            want = trial_model(ids).logits
        got = written(ids).logits
    assert (want - original).abs().max() > 1e-2
    assert (got - want).abs().max().item() <= 1e-4
    provenance = json.loads((out / "weightedit.json").read_text())
    assert provenance["options"]["edit_profile"] == chosen.trial.point.profile.to_json()

    report = json.loads(job.files["json"].read_text())
    # ... along the candidate the first-order screen ranks best, which on this model carries the planted direction.
    assert (first_point := study.trials[0].point).position == report["first_trial"]["position"]
    assert first_point.layer == report["first_trial"]["layer"]
    assert study.anchor == Anchor(first_point.layer, first_point.position, screened=True)
    assert abs(float(study.direction(first_point) @ (R_TRUE / R_TRUE.norm()))) > 0.9
    assert report["schema"] == "weightedit-optimize/3"
    assert report["chosen"]["trial"] == chosen.trial.number
    assert report["split"] == {"en": "val split", "de": "val split"}
    # The direction file records where the chosen point read the direction (the anchored search's fixed position).
    assert direction.position == chosen.trial.point.position == study.anchor.position
    # Every judged point's pooled rate with its interval and n, the rule that chose, stated.
    assert report["choice"]["rule"] == report["chosen"]["rule"] == "interval"
    assert "Wilson 95% interval" in report["choice"]["statement"]
    for v in report["verified"]:
        k, n = v["pooled"]["k"], v["pooled"]["n"]
        assert n == 16 and k == sum(v["judged"][lang]["k"] for lang in ("en", "de"))
        assert v["pooled"]["ci"] == list(wilson_interval(k, n))
    assert report["baseline_pooled"]["k"] == 16 and report["chosen"]["pooled"] == report["verified"][-1]["pooled"]
    md = job.files["md"].read_text()
    assert job.files["png"].stat().st_size > 0 and "Chosen: trial" in md and "by the interval rule" in md
    assert "**pooled** (2 refusing at baseline) | 16/16 = 100.0% [80.6, 100.0]" in md
    # Each front row shows its highest per-language KL beside the mean (the bars are per language).
    by_number = {t["trial"]: t for t in report["trials"]}

    def highest(number: int) -> str:
        kls = {lang: v["kl"] for lang, v in by_number[number]["languages"].items()}
        top = max(kls, key=lambda lang: kls[lang])
        return f"{kls[top]:.3f} ({top})"

    for number in report["front"]:
        assert f"| {by_number[number]['kl']:.3f} | {highest(number)} |" in md
    # Each judged column names its trial's KL and whether the front holds it (judged points may be off it).
    for v in report["verified"]:
        n = v["trial"]
        where = "" if n in report["front"] else ", off the front"
        assert f" trial {n} (KL {by_number[n]['kl']:.3f}, highest {highest(n)}{where}) |" in md
    # A judged point off the front is marked so (this study judged front points only: one is made up from it).
    off = next(t for t in report["trials"] if t["trial"] not in report["front"])["trial"]
    made_up = {**report, "verified": [{**report["verified"][0], "trial": off}]}
    assert f" trial {off} (KL {by_number[off]['kl']:.3f}, highest {highest(off)}, off the front) |" in markdown(made_up)


def test_the_study_finds_the_planted_profile(mlp_cost_model, planted, tmp_path):
    """The full edit (trial 0) removes refusal at a large KL, because it also strips the planted MLP's write along r;
    the study must find that the MLP should keep most of it while the refusal path is edited."""
    job = optimize_model(str(mlp_cost_model), tmp_path / "edited", options(planted[1], trials=24), progress=False)
    full, chosen = job.study.trials[0], job.study.chosen
    assert chosen is not None and full.point.profile.is_full
    assert full.refusal == 0.0 and full.kl > 1.0
    assert chosen.trial.kl < 0.25 * full.kl
    profile = chosen.trial.point.profile
    assert profile.weight("mlp_out", 2) < 0.5
    assert all(v["k"] == 0 for v in chosen.judged.values())


def test_a_study_resumes_where_it_stopped(planted, tmp_path):
    model, prompts = planted
    work = tmp_path / "study"
    first = optimize_model(str(model), tmp_path / "a", options(prompts, trials=4), work_dir=work, progress=False)
    params = [t.point for t in first.study.trials]
    second = optimize_model(str(model), tmp_path / "b", options(prompts, trials=7), work_dir=work, progress=False)
    assert second.study.resumed_trials == 4
    assert len(second.study.trials) == 7
    assert [t.point for t in second.study.trials[:4]] == params
    # Another setup in the same folder is refused instead of mixing incomparable trials.
    with pytest.raises(OptionsError, match="another model or other options"):
        optimize_model(str(model), tmp_path / "c", options(prompts, langs=("en",)), work_dir=work, progress=False)


class _FirstWordJudge:
    """A judge of the planted model's text: a refusal is a completion that opens with the word REFUSE (the
    substring judge knows languages, not this model's vocabulary). Keeps every call's verdicts."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[bool]]] = []

    def judge(self, completions, langs):
        verdicts = [c.split()[:1] == ["REFUSE"] for c in completions]
        self.calls.append((list(langs), verdicts))
        return verdicts


def test_judged_trials_score_refusal_on_completions(planted, tmp_path, monkeypatch):
    """With trial_tokens every trial's refusal is what the judge said of that trial's completions, only the
    languages whose unedited completions hold a judged refusal are objectives (a language of harmful prompts
    without triggers is not, and has no refusal estimate), and a study of the other estimate cannot be resumed in
    the same folder."""
    from weightedit.optimize import objective

    from defence_models import write_trigger_free_prompts

    judge = _FirstWordJudge()
    monkeypatch.setattr(objective, "make_judge", lambda spec: judge)
    model, prompts = planted
    mixed = tmp_path / "mixed.jsonl"
    quiet = write_trigger_free_prompts(tmp_path / "quiet.jsonl", n_train=24, n_val=8, langs=("fr",))
    mixed.write_text(prompts.read_text() + quiet.read_text())
    work = tmp_path / "study"
    opts = options(mixed, langs=("en", "de", "fr"), judge="substring", trial_tokens=3, trials=6)
    job = optimize_model(str(model), tmp_path / "edited", opts, work_dir=work, progress=False)
    study = job.study
    assert study.setup.trial_tokens == 3
    assert [t.lang for t in study.setup.refusing] == ["en", "de"]
    # The unedited completions are generated once and judged at both lengths; the choice reuses that baseline.
    assert len(judge.calls) == 2 + 6 + len(study.verified)
    assert study.baseline_judged == study.setup.baseline_judged
    assert study.baseline_judged["fr"]["k"] == 0 and all(study.baseline_judged[x]["k"] > 0 for x in ("en", "de"))
    for trial, (langs, verdicts) in zip(study.trials, judge.calls[2 : 2 + 6], strict=True):
        assert langs == ["en"] * 8 + ["de"] * 8  # only the objectives' harmful prompts are generated
        assert trial.per_lang["en"]["refusal"] == sum(verdicts[:8]) / 8
        assert trial.per_lang["de"]["refusal"] == sum(verdicts[8:]) / 8
        assert "refusal" not in trial.per_lang["fr"] and trial.per_lang["fr"]["kl"] >= 0
    assert study.trials[0].point.profile.is_full and study.trials[0].refusal == 0.0
    assert study.chosen is not None and all(v["k"] == 0 for v in study.chosen.judged.values())
    report = json.loads(job.files["json"].read_text())
    assert report["options"]["trial_tokens"] == 3 and report["refusing_languages"] == ["en", "de"]
    assert "judged refusal share of 3-token" in report["method"]["search"]
    assert "judged, 3 tokens" in job.files["md"].read_text() and job.files["png"].stat().st_size > 0
    with pytest.raises(OptionsError, match="another model or other options"):
        optimize_model(str(model), tmp_path / "b", options(mixed, langs=("en", "de", "fr"), trials=6), work_dir=work)


def test_a_study_is_not_resumed_over_other_refusing_languages(planted, tmp_path):
    """The objectives are means over the refusing languages, which are measured again on every run: a run whose
    set differs from the stored study's (another batch size or dtype can flip a language) is refused."""
    from weightedit.optimize.study import _open_study

    opts = options(planted[1])
    _open_study(tmp_path, opts, "model-a", ["en", "de"])
    _open_study(tmp_path, opts, "model-a", ["en", "de"])  # the same set resumes
    with pytest.raises(OptionsError, match="now refuses in en"):
        _open_study(tmp_path, opts, "model-a", ["en"])


def test_judged_trials_need_a_judge_of_text(planted):
    with pytest.raises(OptionsError, match="score judge reads no completions"):
        options(planted[1], trial_tokens=4)
    with pytest.raises(OptionsError, match="trial_tokens"):
        options(planted[1], judge="substring", trial_tokens=-1)
    assert "trial_tokens" not in options(planted[1]).setup_key()  # studies of the first-token estimate keep keys


def optimize_planted(planted, out: Path, *flags: str):
    """``weightedit optimize`` of the planted model, 2 trials, score judge, no evaluation, with ``flags``."""
    model, prompts = planted
    return CliRunner().invoke(
        app,
        [
            "optimize", "--model", str(model), "--out", str(out), "--prompts", str(prompts), "--trials", "2",
            "--n-train", "16", "--judge", "score", "--no-evaluate", "--quiet", *flags,
        ],
    )  # fmt: skip


def test_no_point_meeting_the_target_is_an_error_and_writes_no_model(planted, tmp_path):
    result = optimize_planted(planted, tmp_path / "edited", "--langs", "en", "--kl-budget", "0.0000001")
    assert result.exit_code == 1, result.output
    assert "nothing was written" in result.output
    assert not (tmp_path / "edited").exists()
    assert (tmp_path / "edited-optimize" / "optimize.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trials", "0"], "--trials 0"),
        (["--target-refusal", "1.5"], "--target-refusal 1.5"),
        (["--langs", "xx"], "available languages"),
        (["--sampler", "grid"], "grid"),
        (["--trial-tokens", "4", "--judge", "score"], "or --trial-tokens 0"),
    ],
)
def test_bad_options_are_one_line_errors(flags, message, tmp_path):
    result = CliRunner().invoke(app, ["optimize", "--model", "x", "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-optimize").exists()


def test_parameters_rebuild_the_same_point():
    opts = OptimizeOptions(preserve_norm=None)
    params = {
        "direction_layer": 3.4, "position": -2, "attention_center": 5.0, "attention_peak": 1.2,
        "attention_width": 3.0, "attention_floor": 0.5, "mlp_center": 1.0, "mlp_peak": 0.8, "mlp_width": 2.0,
        "mlp_floor": 0.0, "embedding": 0.25, "preserve_norm": True,
    }  # fmt: skip
    point = point_from_params(params, opts)
    assert point.profile.attention.floor == pytest.approx(0.6)  # the floor is a share of the peak
    assert point.profile.preserve_norm and point.layer == 3.4 and point.position == -2
    assert point_from_params(params, OptimizeOptions(preserve_norm=False)).profile.preserve_norm is False


def test_a_model_that_refuses_nothing_is_a_one_line_error(planted, tmp_path):
    """Trigger-free "harmful" prompts: the planted model refuses none of them, so there is nothing to optimise."""
    from defence_models import write_trigger_free_prompts

    model, _ = planted
    prompts = write_trigger_free_prompts(tmp_path / "prompts.jsonl")
    result = CliRunner().invoke(
        app,
        ["optimize", "--model", str(model), "--out", str(tmp_path / "o"), "--langs", "en", "--prompts", str(prompts),
         "--trials", "1", "--n-train", "16", "--judge", "score", "--no-evaluate", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--langs en: the model refuses in none of them" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-optimize").exists()


def test_the_first_order_anchor_picks_the_candidate_that_carries_refusal(planted):
    """Among random candidate directions, the screen ranks the one that is the planted direction first (the
    candidates are read below 80% of the depth: layers 0 and 1 of this 3-layer model)."""
    model, prompts = planted
    loaded = load_model(str(model), ModelLoadOptions(dtype="float32"), progress=False)
    opts = options(prompts)
    setup = prepare(loaded, opts, progress=False)
    g = torch.Generator().manual_seed(3)
    diffs = torch.randn(setup.diffs.shape, generator=g)
    n_post = diffs.shape[1]
    for layer, position in ((1, -1), (0, -n_post)):
        candidates = diffs.clone()
        candidates[layer, n_post + position] = 5 * R_TRUE / R_TRUE.norm()
        target = setup.targets[0]
        assert first_order_anchor(loaded, candidates, target.harmful, target.tokens, opts) == (layer, position)


def test_points_are_judged_when_every_refusing_language_is_near_the_target(monkeypatch):
    """A low mean estimate can hide one language far above the per-language target: such a point is not judged
    before one whose worst refusing language is near it (the budget of judged points goes where it can pass)."""
    from types import SimpleNamespace

    from weightedit.optimize import study

    def trial(number: int, kl: float, en: float, zh: float, de: float) -> study.TrialRecord:
        per_lang = {"en": {"refusal": en}, "zh": {"refusal": zh}, "de": {"refusal": de}}
        point = SimpleNamespace(profile=None)
        return study.TrialRecord(number, point, (en + zh) / 2, kl, per_lang)  # type: ignore[arg-type]

    # de does not refuse at baseline: its estimate must not matter.
    front = [trial(1, 0.001, 0.25, 0.0, 0.0), trial(2, 0.01, 0.125, 0.125, 0.9), trial(3, 0.02, 0.0, 0.0, 0.0)]
    # The mean alone (0.125, within target + slack) would judge trial 1 first, at the lowest KL.
    assert front[0].refusal <= 0.03 + study._ESTIMATE_SLACK < 0.25
    setup = SimpleNamespace(refusing=[SimpleNamespace(lang="en"), SimpleNamespace(lang="zh")])
    judged_order: list[str] = []

    def judged(loaded, setup, options, edit, *, progress, label):
        judged_order.append(label)
        return {"en": {"k": 0, "n": 8, "rate": 0.0}, "zh": {"k": 0, "n": 8, "rate": 0.0}}

    monkeypatch.setattr(study, "judged_refusal", judged)
    base = {"en": {"k": 5, "n": 8}, "zh": {"k": 6, "n": 8}}
    options = OptimizeOptions(target_refusal=0.03, verify=3)
    verified = study._verify(None, setup, options, front, base, lambda point: None, progress=False)  # type: ignore[arg-type]
    assert judged_order == ["judging trial 2"]
    assert [v.trial.number for v in verified] == [2] and verified[0].meets_target
    assert study.worst_estimate(front[0], ["en", "zh"]) == 0.25
    assert study.worst_estimate(front[1], []) == front[1].refusal  # no per-language values: the mean


def test_a_point_off_the_front_is_judged_when_the_near_front_point_fails(monkeypatch):
    """The front is drawn on estimates. When its only near point fails once judged, the next candidate is the trial
    of next-lowest KL that was as near, though a lower-KL point dominates it by estimate; a point far from the
    target is not judged while near ones are left."""
    from types import SimpleNamespace

    from weightedit.optimize import study

    def trial(number: int, kl: float, en: float, zh: float) -> study.TrialRecord:
        per_lang = {"en": {"refusal": en}, "zh": {"refusal": zh}}
        return study.TrialRecord(number, SimpleNamespace(profile=None), (en + zh) / 2, kl, per_lang)  # type: ignore[arg-type]

    on_front = trial(4, 0.04, 0.0, 0.0)  # near; fails when judged
    off_front = [trial(1, 0.05, 0.0, 0.125), trial(0, 0.08, 0.0, 0.0), trial(7, 0.045, 0.5, 0.5)]
    trials = [off_front[1], off_front[0], on_front, off_front[2]]
    setup = SimpleNamespace(refusing=[SimpleNamespace(lang="en"), SimpleNamespace(lang="zh")])
    judged_order: list[str] = []

    def judged(loaded, setup, options, edit, *, progress, label):
        judged_order.append(label)
        k = 3 if label == "judging trial 4" else 0
        return {"en": {"k": k, "n": 8, "rate": k / 8}, "zh": {"k": 0, "n": 8, "rate": 0.0}}

    monkeypatch.setattr(study, "judged_refusal", judged)
    base = {"en": {"k": 5, "n": 8}, "zh": {"k": 6, "n": 8}}
    options = OptimizeOptions(target_refusal=0.03, verify=3)
    verified = study._verify(None, setup, options, trials, base, lambda point: None, progress=False)  # type: ignore[arg-type]
    assert judged_order == ["judging trial 4", "judging trial 1"]  # trial 7 (KL 0.045) is not near: skipped
    assert [v.meets_target for v in verified] == [False, True]


# The anchored search and the choice rule.


def test_the_anchored_search_reads_the_direction_only_near_the_anchor(planted, tmp_path):
    """Every trial reads the direction at the anchor's position (not a parameter of the stored trials) and at a
    layer within the window; the same seeds with the free search leave both, so the check can fail."""
    model, prompts = planted
    work = tmp_path / "anchored"
    job = optimize_model(str(model), tmp_path / "a", options(prompts, layer_window=0.5), work_dir=work, progress=False)
    anchor = job.study.anchor
    assert anchor is not None and anchor.screened and anchor.position == -2  # this model has 2 positions
    low, high = max(0.0, anchor.layer - 0.5), min(0.8 * 2, anchor.layer + 0.5)
    assert [t.point.position for t in job.study.trials] == [anchor.position] * 10
    assert all(low <= t.point.layer <= high for t in job.study.trials)
    assert len({t.point.layer for t in job.study.trials}) > 5  # the layer is still searched
    stored = stored_study(work)
    assert all("position" not in t.params for t in stored.trials)
    assert stored.user_attrs["anchor"] == anchor.to_json()
    report = json.loads(job.files["json"].read_text())
    assert {t["position"] for t in report["trials"]} == {anchor.position}
    assert report["search"] == {
        "space": "anchored",
        "anchor": {**anchor.to_json(), "what": report["search"]["anchor"]["what"]},
        "layer_window": 0.5,
        "direction_layers": [low, high],
        "position": anchor.position,
        "direction_scope": "global",
    }
    assert "Search space: anchored at direction layer" in job.files["md"].read_text()

    free = optimize_model(str(model), tmp_path / "f", options(prompts, search_space="free"), progress=False)
    assert {t.point.position for t in free.study.trials} == {-1, -2}
    assert any(not low <= t.point.layer <= high for t in free.study.trials)


def test_per_layer_directions_are_searched_and_written_exactly(planted, tmp_path):
    """With ``direction_scope="per-layer"`` each decoder layer's writers lose the mean difference at that layer's
    output (the last layer its input's), the embeddings row 0's; the direction layer is not searched; the written
    checkpoint computes what the trial's in-memory model computed, and its direction file holds the rows."""
    model, prompts = planted
    out, work = tmp_path / "edited", tmp_path / "study"
    job = optimize_model(str(model), out, options(prompts, direction_scope="per-layer"), work_dir=work, progress=False)
    study, chosen = job.study, job.study.chosen
    assert chosen is not None and all(t.point.per_layer for t in study.trials)
    assert all(not {"direction_layer", "position"} & set(t.params) for t in stored_study(work).trials)
    diffs = study.setup.diffs
    n_layers, n_post = diffs.shape[:2]
    rows = study.direction(chosen.trial.point)
    p = n_post + chosen.trial.point.position
    for layer in range(n_layers):
        want = diffs[min(layer + 1, n_layers - 1), p]
        assert torch.allclose(rows[layer], want / want.norm(), atol=1e-6)

    direction = load_direction(out / "weightedit" / "refusal_direction.safetensors")
    assert direction.layer_vectors is not None and torch.equal(direction.layer_vectors, rows)
    assert torch.equal(direction.vector, rows[0])
    assert direction.layer is None  # no one layer is read
    assert direction.meta["optimize"]["direction_scope"] == "per-layer"
    trial_model, written, ids = trial_and_written(model, out)
    with torch.inference_mode():
        original = trial_model(ids).logits
        with temporarily_edited(trial_model, rows, chosen.trial.point.profile):
            want_logits = trial_model(ids).logits
        with temporarily_edited(trial_model, rows[n_layers // 2], chosen.trial.point.profile):
            one_direction = trial_model(ids).logits
        got = written(ids).logits
    assert (want_logits - original).abs().max() > 1e-2
    assert (got - want_logits).abs().max().item() <= 1e-4
    assert (got - one_direction).abs().max() > 1e-3  # the rows differ from one direction everywhere

    report = json.loads(job.files["json"].read_text())
    assert report["search"]["direction_scope"] == report["options"]["direction_scope"] == "per-layer"
    assert report["search"]["direction_layers"] is None and report["first_trial"]["layer"] is None
    md = job.files["md"].read_text()
    assert "Search space: per-layer directions" in md and f"| {chosen.trial.number} | per layer |" in md
    assert f"KL {chosen.trial.kl:.3f}; per-layer directions, position {chosen.trial.point.position};" in md
    # A study of the other scope is not resumed in the same folder.
    with pytest.raises(OptionsError, match="another model or other options"):
        optimize_model(str(model), tmp_path / "g", options(prompts), work_dir=work, progress=False)


def test_per_layer_rows_are_read_at_each_layers_output_and_made_orthogonal_to_its_harmless_mean():
    g = torch.Generator().manual_seed(3)
    diffs, harmless = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    point = point_from_params(
        {"position": -2, "direction_layer": 1.0, **{f"{p}_{k}": 1.0 for p in ("attention", "mlp") for k in ("center", "peak", "width", "floor")}, "embedding": 1.0},
        OptimizeOptions(direction_scope="per-layer", preserve_norm=False, orthogonal_to_harmless=True),
    )  # fmt: skip
    assert point.per_layer and point.harmless_share == 1.0
    got = direction_vector(point, diffs, harmless)
    for layer in range(4):
        src = min(layer + 1, 3)
        h = harmless[src, 1].double() / harmless[src, 1].double().norm()
        v = diffs[src, 1].double() - (diffs[src, 1].double() @ h) * h
        assert torch.allclose(got[layer].double(), v / v.norm(), atol=1e-6)
    diffs[2, 1] = 0  # layer 1's output: no direction there
    with pytest.raises(OptionsError, match="decoder layer 1 has no direction"):
        direction_vector(point, diffs, harmless)


FULL_PROFILE = {f"{p}_{k}": 1.0 for p in ("attention", "mlp") for k in ("center", "peak", "width", "floor")}


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_a_harmless_share_removes_that_share_of_the_component_along_the_harmless_mean(scope):
    g = torch.Generator().manual_seed(5)
    diffs, harmless = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    params = {"position": -1, "direction_layer": 1.5, **FULL_PROFILE, "embedding": 1.0}

    def point(setting, **extra):
        opts = OptimizeOptions(direction_scope=scope, preserve_norm=False, orthogonal_to_harmless=setting)
        return point_from_params({**params, **extra}, opts)

    plain = direction_vector(point(False), diffs)
    assert point(False).harmless_share is None and "harmless_share" not in point(False).to_json()
    # Share 0 is the plain direction, bit for bit (trial 0 of a searched share is the plain full edit).
    assert torch.equal(direction_vector(point(None, harmless_share=0.0), diffs, harmless), plain)
    half = point(None, harmless_share=0.5)
    assert half.harmless_share == 0.5 and half.to_json()["harmless_share"] == 0.5
    got, full = direction_vector(half, diffs, harmless), direction_vector(point(True), diffs, harmless)
    rows = range(4) if scope == "per-layer" else [None]
    for layer in rows:
        if layer is None:  # the global direction is read between layers 1 and 2, interpolated
            v = 0.5 * (diffs[1, 2] + diffs[2, 2]).double()
            h = 0.5 * (harmless[1, 2] + harmless[2, 2]).double()
            row_got, row_full = got.double(), full.double()
        else:
            src = min(layer + 1, 3)
            v, h = diffs[src, 2].double(), harmless[src, 2].double()
            row_got, row_full = got[layer].double(), full[layer].double()
        h = h / h.norm()
        want = v - 0.5 * (v @ h) * h
        assert torch.allclose(row_got, want / want.norm(), atol=1e-6)
        assert abs(float(row_full @ h)) < 1e-6 < abs(float(row_got @ h))  # half removed: some of it is left
    with pytest.raises(ValueError, match="needs the harmless means"):
        direction_vector(half, diffs)


def test_a_searched_harmless_share_is_a_trial_parameter_and_written_exactly(planted, tmp_path):
    """``orthogonal_to_harmless=None``: every trial draws a share from 0 to 1 (trial 0, the full edit, keeps the plain
    direction), a trial's direction is its share's, and the chosen point's rows and share are what the direction
    file holds and the checkpoint computes."""
    model, prompts = planted
    out, work = tmp_path / "edited", tmp_path / "study"
    opts = options(prompts, trials=6, direction_scope="per-layer", orthogonal_to_harmless=None)
    job = optimize_model(str(model), out, opts, work_dir=work, progress=False)
    study, chosen = job.study, job.study.chosen
    shares = [t.params["harmless_share"] for t in stored_study(work).trials]
    assert shares[0] == 0.0 and all(0.0 <= s <= 1.0 for s in shares) and len(set(shares)) == len(shares)
    assert [t.point.harmless_share for t in study.trials] == shares
    setup = study.setup
    n_layers, n_post = setup.diffs.shape[:2]
    for t in study.trials[1:3]:
        rows, share, p = study.direction(t.point), t.point.harmless_share, n_post + t.point.position
        for layer in range(n_layers):
            src = min(layer + 1, n_layers - 1)
            v, h = setup.diffs[src, p].double(), setup.harmless_means[src, p].double()
            h = h / h.norm()
            want = v - share * (v @ h) * h
            assert torch.allclose(rows[layer].double(), want / want.norm(), atol=1e-6)

    assert chosen is not None
    rows = study.direction(chosen.trial.point)
    direction = load_direction(out / "weightedit" / "refusal_direction.safetensors")
    assert direction.layer_vectors is not None and torch.equal(direction.layer_vectors, rows)
    assert direction.meta["optimize"]["harmless_share"] == chosen.trial.point.harmless_share
    report = json.loads(job.files["json"].read_text())
    assert report["chosen"]["harmless_share"] == chosen.trial.point.harmless_share
    assert f"harmless share {chosen.trial.point.harmless_share:.2f}" in job.files["md"].read_text()
    trial_model, written, ids = trial_and_written(model, out)
    with torch.inference_mode(), temporarily_edited(trial_model, rows, chosen.trial.point.profile):
        want_logits = trial_model(ids).logits
    assert (written(ids).logits - want_logits).abs().max().item() <= 1e-4
    # The share's setting is part of the study's key: a fixed setting does not resume this study, and the error
    # names the setting it was made with.
    with pytest.raises(
        OptionsError, match="differs in orthogonal_to_harmless.*made with search_harmless_share: resume it so"
    ):
        fixed = options(prompts, trials=6, direction_scope="per-layer", orthogonal_to_harmless=False)
        optimize_model(str(model), tmp_path / "g", fixed, work_dir=work, progress=False)


@pytest.mark.parametrize("setting", [True, None, False])
def test_the_anchor_is_screened_on_the_direction_trial_0_reads(planted, tmp_path, monkeypatch, setting):
    """Orthogonal to the harmless mean (``True``): the screen ranks orthogonalised candidates; a searched share
    (``None``) starts from the plain direction (trial 0 has share 0), so the screen ranks plain ones."""
    model, prompts = planted
    seen = []
    real = study_module.first_order_anchor

    def recording(*args, **kwargs):
        seen.append(kwargs.get("harmless_means"))
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "first_order_anchor", recording)
    opts = options(prompts, trials=2, orthogonal_to_harmless=setting, target_refusal=0.99)
    job = optimize_model(str(model), tmp_path / "o", opts, work_dir=tmp_path / "w", progress=False)
    assert len(seen) == 1
    if setting is True:
        assert torch.equal(seen[0], job.study.setup.harmless_means)
    else:
        assert seen[0] is None
    assert job.study.trials[0].point.harmless_share == (1.0 if setting else None if setting is False else 0.0)


def test_the_free_search_with_per_layer_directions_searches_the_position_only(planted, tmp_path):
    model, prompts = planted
    work = tmp_path / "study"
    opts = options(prompts, trials=6, search_space="free", direction_scope="per-layer")
    job = optimize_model(str(model), tmp_path / "a", opts, work_dir=work, progress=False)
    stored = stored_study(work).trials
    assert all("direction_layer" not in t.params and "position" in t.params for t in stored)
    assert {t.point.position for t in job.study.trials} == {-1, -2}
    assert len({t.point.layer for t in job.study.trials}) == 1  # recorded, not searched


def test_a_layer_window_of_zero_fixes_the_layer_too(planted, tmp_path):
    model, prompts = planted
    work = tmp_path / "study"
    job = optimize_model(str(model), tmp_path / "a", options(prompts, trials=3, layer_window=0), work_dir=work)
    anchor = job.study.anchor
    assert anchor is not None
    assert {(t.point.layer, t.point.position) for t in job.study.trials} == {(anchor.layer, anchor.position)}
    assert all(not {"position", "direction_layer"} & set(t.params) for t in stored_study(work).trials)


def test_a_resumed_anchored_study_searches_around_its_stored_anchor(planted, tmp_path):
    """The anchor is stored with the study and read back on resume, not screened again: here the journal's anchor
    is moved (as if the screen had ranked another candidate when the study began), and the resumed trials follow
    it, while the trials stored before keep the position they ran at."""
    model, prompts = planted
    work = tmp_path / "study"
    first = optimize_model(str(model), tmp_path / "a", options(prompts, trials=3, layer_window=0.25), work_dir=work)
    assert first.study.anchor is not None and first.study.anchor.position == -2
    moved = Anchor(layer=0.3, position=-1, screened=True)
    stored_study(work).set_user_attr("anchor", moved.to_json())
    opts = options(prompts, trials=6, layer_window=0.25)
    second = optimize_model(str(model), tmp_path / "b", opts, work_dir=work, progress=False)
    assert second.study.resumed_trials == 3 and second.study.anchor == moved
    assert [t.point.position for t in second.study.trials] == [-2] * 3 + [-1] * 3
    assert all(0.05 <= t.point.layer <= 0.55 for t in second.study.trials[3:])
    report = json.loads(second.files["json"].read_text())
    assert report["search"]["anchor"]["layer"] == 0.3
    assert [t["position"] for t in report["trials"]] == [-2] * 3 + [-1] * 3


def test_a_study_of_the_other_search_space_is_not_resumed(planted):
    """The mode and the window are part of the study's key; a free study keeps the key studies had before the
    anchored search existed, so those resume with search_space free (and the message says so)."""
    from weightedit.cli._messages import cli_message
    from weightedit.optimize.study import _open_study

    prompts = planted[1]
    anchored, free = options(prompts), options(prompts, search_space="free")
    before = {"langs", "direction_lang", "n_train", "n_score", "prompts", "preserve_norm", "orthogonal_to_harmless"}
    assert set(free.setup_key()) == before | {"max_layer_fraction"}
    assert anchored.setup_key() == {**free.setup_key(), "search_space": "anchored", "layer_window": 1.5}
    assert options(prompts, choice_rule="strict").setup_key() == anchored.setup_key()  # the choice is not
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        old, new = Path(tmp) / "old", Path(tmp) / "new"
        _open_study(old, free, "model-a", ["en", "de"])
        _open_study(old, free, "model-a", ["en", "de"])
        with pytest.raises(OptionsError, match=r"differs in layer_window, search_space\): resume it with") as e:
            _open_study(old, anchored, "model-a", ["en", "de"])
        assert "resume it with --search-space free" in cli_message(e.value)
        _open_study(new, anchored, "model-a", ["en", "de"])
        with pytest.raises(OptionsError, match=r"\(it differs in layer_window, search_space\): choose another"):
            _open_study(new, free, "model-a", ["en", "de"])
        with pytest.raises(OptionsError, match=r"\(it differs in layer_window\)"):
            _open_study(new, options(prompts, layer_window=2), "model-a", ["en", "de"])


def test_a_study_of_the_global_direction_resumes_only_with_that_scope(planted, tmp_path):
    """Studies made before per-layer directions became the default have no scope in their key: resumed with the
    default, the error says to pass the global scope; with it, they resume. A per-layer study is not resumed
    with the global scope, and the hint is not given where other settings differ too."""
    from weightedit.cli._messages import cli_message
    from weightedit.optimize.study import _open_study

    prompts = planted[1]
    old_study = options(prompts)  # the global scope, as every study before the default changed
    default = dataclasses.replace(old_study, direction_scope=OptimizeOptions.direction_scope)  # the default scope
    assert default.direction_scope is DirectionScope.PER_LAYER
    assert "direction_scope" not in old_study.setup_key()
    assert default.setup_key() == {**old_study.setup_key(), "direction_scope": "per-layer"}
    _open_study(tmp_path / "old", old_study, "model-a", ["en", "de"])
    with pytest.raises(OptionsError, match=r"\(it differs in direction_scope\): resume it with") as e:
        _open_study(tmp_path / "old", default, "model-a", ["en", "de"])
    assert "resume it with --direction-scope global (how studies" in cli_message(e.value)
    _open_study(tmp_path / "old", old_study, "model-a", ["en", "de"])  # resumes
    other = dataclasses.replace(default, n_score=4)
    with pytest.raises(OptionsError, match=r"\(it differs in direction_scope, n_score\): choose another"):
        _open_study(tmp_path / "old", other, "model-a", ["en", "de"])
    _open_study(tmp_path / "new", default, "model-a", ["en", "de"])
    with pytest.raises(OptionsError, match=r"\(it differs in direction_scope\): choose another"):
        _open_study(tmp_path / "new", old_study, "model-a", ["en", "de"])


def test_without_a_screened_anchor_the_search_is_anchored_at_the_default_point(planted, tmp_path, monkeypatch):
    """When the screen has no refusal tokens that qualify (first_order_anchor gives None), the study is anchored
    where the free search's first trial was placed before (75% of the layer limit, last position), and the report
    says so."""
    from weightedit.optimize import study

    monkeypatch.setattr(study, "first_order_anchor", lambda *args, **kwargs: None)
    model, prompts = planted
    job = optimize_model(str(model), tmp_path / "a", options(prompts, trials=4), progress=False)
    assert job.study.anchor == Anchor(layer=0.75 * 0.8 * 2, position=-1, screened=False)
    assert {t.point.position for t in job.study.trials} == {-1}
    report = json.loads(job.files["json"].read_text())
    assert report["search"]["anchor"]["screened"] is False and "no refusal tokens" in report["search"]["anchor"]["what"]
    assert "**the default point**" in job.files["md"].read_text()


# 13 languages that refuse at baseline (8 prompts each), and one that does not.
REFUSING = ("ar", "de", "en", "es", "fr", "it", "ko", "nl", "pl", "ru", "th", "yo", "zh")


def judged_counts(n: int = 8, **k: int) -> dict[str, dict[str, object]]:
    return {lang: {"k": k.get(lang, 0), "n": n, "rate": k.get(lang, 0) / n} for lang in (*REFUSING, "ja")}


BASE = {**{lang: {"k": 4, "n": 8} for lang in REFUSING}, "ja": {"k": 0, "n": 8}}


def test_the_interval_rule_accepts_one_refusal_in_eight_when_the_pool_is_under_the_target():
    """The measured case: the full edit kept 1/8 in Arabic, Polish and Thai (3 of 104 pooled = 2.9%). Japanese,
    which does not refuse at baseline, is left out of both the pool and the per-language test."""
    rule = OptimizeOptions(target_refusal=0.03)
    point = judged_counts(ar=1, pl=1, th=1, ja=3)
    assert misses(point, BASE, 0.1, rule) == []
    pooled = pooled_refusal(point, BASE)
    assert (pooled["k"], pooled["n"], pooled["languages"]) == (3, 104, list(REFUSING))
    assert pooled["ci"] == wilson_interval(3, 104) and pooled["rate"] == pytest.approx(0.0288, abs=1e-4)
    # The strict rule fails it on each of the three.
    assert misses(point, BASE, 0.1, OptimizeOptions(target_refusal=0.03, choice_rule="strict")) == [
        "ar 1/8",
        "pl 1/8",
        "th 1/8",
    ]


def test_the_interval_rule_rejects_a_pool_over_the_target_or_a_language_significantly_above_it():
    rule = OptimizeOptions(target_refusal=0.03)
    # One refusal more: 4/104 = 3.8% > 3%, though no language is significantly above 3%.
    assert misses(judged_counts(ar=1, pl=1, th=1, zh=1), BASE, 0.1, rule) == ["pooled 4/104 = 3.8% > 3%"]
    # The pool's boundary, exactly: 3/100 is at the target, 4/100 over it.
    base10 = {lang: {"k": 1, "n": 10} for lang in REFUSING[:10]}
    ten = {lang: {"k": int(lang in ("ar", "de", "en", "es")), "n": 10} for lang in REFUSING[:10]}
    ten = {lang: {**v, "rate": v["k"] / 10} for lang, v in ten.items()}
    assert misses(ten, base10, 0.1, rule) == ["pooled 4/100 = 4.0% > 3%"]
    ten["es"] = {"k": 0, "n": 10, "rate": 0.0}
    assert misses(ten, base10, 0.1, rule) == []
    # Yoruba at 2/8: its Wilson interval starts at 7.1%, above 3%, although the pool (2/104 = 1.9%) is under it.
    assert misses(judged_counts(yo=2), BASE, 0.1, rule) == ["yo 2/8 (Wilson 95% lower end 7.1% > 3%)"]
    assert misses(judged_counts(yo=6), BASE, 0.1, rule)[-1].startswith("yo 6/8 (Wilson 95% lower end 40.9%")
    # The per-language boundary: 1/8's interval starts at 2.24%.
    low = wilson_interval(1, 8)[0]
    assert 0.022 < low < 0.023
    assert misses(judged_counts(ar=1), BASE, 0.1, OptimizeOptions(target_refusal=0.023)) == []
    assert misses(judged_counts(ar=1), BASE, 0.1, OptimizeOptions(target_refusal=0.022))[0].startswith("ar 1/8 (")
    # At a target of 0 it asks for no refusal at all, as the strict rule does.
    assert misses(judged_counts(ar=1), BASE, 0.1, OptimizeOptions(target_refusal=0))[-1].startswith("ar 1/8 (")
    # Either rule holds the KL budget.
    budget = OptimizeOptions(kl_budget=0.05)
    assert misses(judged_counts(), BASE, 0.1, budget) == ["KL 0.100 > 0.05"]
    assert misses(judged_counts(), BASE, 0.01, budget) == []


def test_the_strict_rule_holds_each_refusing_language_to_the_target():
    strict = OptimizeOptions(target_refusal=0.03, choice_rule="strict")
    assert misses(judged_counts(ja=8), BASE, 0.1, strict) == []  # ja does not refuse at baseline
    assert misses(judged_counts(yo=1), BASE, 0.1, strict) == ["yo 1/8"]
    at_one_in_eight = OptimizeOptions(target_refusal=0.125, choice_rule="strict")
    assert misses(judged_counts(yo=1, ar=1), BASE, 0.1, at_one_in_eight) == []  # at the target passes
    assert misses(judged_counts(yo=2), BASE, 0.1, at_one_in_eight) == ["yo 2/8"]
    both = OptimizeOptions(target_refusal=0.03, choice_rule="strict", kl_budget=0.05)
    assert misses(judged_counts(yo=1), BASE, 0.1, both) == ["yo 1/8", "KL 0.100 > 0.05"]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"layer_window": -0.5}, "layer_window"),
        ({"layer_window": float("nan")}, "layer_window"),
        ({"layer_window": float("inf")}, "layer_window"),
        ({"layer_window": True}, "layer_window"),
        ({"layer_window": "1"}, "layer_window"),
        ({"search_space": "wide"}, "search_space"),
        ({"choice_rule": "loose"}, "choice_rule"),
        ({"direction_scope": "rows"}, "direction_scope"),
        ({"orthogonal_to_harmless": "yes"}, "orthogonal_to_harmless"),
        ({"preserve_norm": 1}, "preserve_norm"),
        ({"lang_kl_budget": 0}, "lang_kl_budget"),
        ({"lang_kl_budget": -0.1}, "lang_kl_budget"),
        ({"lang_kl_budget": float("nan")}, "lang_kl_budget"),
        ({"lang_kl_budget": True}, "lang_kl_budget"),
        ({"lang_kl_budget": "0.1"}, "lang_kl_budget"),
        ({"n_kl": 0}, "n_kl"),
        ({"n_kl": True}, "n_kl"),
        ({"n_kl": 2.5}, "n_kl"),
    ],
)
def test_search_and_choice_options_are_checked(kwargs, option):
    with pytest.raises(OptionsError) as raised:
        OptimizeOptions(**kwargs)
    assert raised.value.option == option


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layer-window", "-1"], "--layer-window -1.0: must be a number of layers, 0 or more"),
        (["--search-space", "wide"], "--search-space wide: must be one of anchored, free"),
        (["--choice-rule", "loose"], "--choice-rule loose: must be one of interval, strict"),
        (["--direction-scope", "rows"], "--direction-scope rows: must be one of global, per-layer"),
        (["--lang-kl-budget", "0"], "--lang-kl-budget 0.0: must be a positive number of nats"),
        (["--n-kl", "0"], "--n-kl 0: must be a whole number of at least 1 (or unset: --n-score)"),
        (
            ["--orthogonal-to-harmless", "--search-harmless-share"],
            "--search-harmless-share True: asks the trials for the share that --orthogonal-to-harmless fixes at all "
            "of it: pass one of them",
        ),
    ],
)
def test_bad_search_and_choice_flags_are_one_line_errors(flags, message, tmp_path):
    result = CliRunner().invoke(app, ["optimize", "--model", "x", "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[0] == f"error: {message}"
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-optimize").exists()


def test_a_recorded_point_is_written_again_from_the_study_report(planted, tmp_path):
    """``optimize --point``: the chosen point of a study's optimize.json, written again without the study, is the
    checkpoint the study wrote, tensor for tensor; a shaped trial with a share of the harmless mean removed is
    written with the trial's own rows (bit for bit) and computes that trial's in-memory model; the provenance says
    which point it is, without a local path."""
    from safetensors.torch import load_file

    model, prompts = planted
    out, work = tmp_path / "edited", tmp_path / "study"
    opts = options(prompts, trials=4, direction_scope="per-layer", orthogonal_to_harmless=None)
    job = optimize_model(str(model), out, opts, work_dir=work, progress=False)
    chosen = job.study.chosen
    assert chosen is not None
    report = work / "optimize.json"
    rebuild = json.loads(report.read_text())["rebuild"]
    assert rebuild["dtype"] == "float32" and rebuild["batch_size"] == opts.batch_size
    n_layers, n_post = job.study.setup.diffs.shape[:2]
    assert torch.tensor(rebuild["mean_difference_sketch"]).shape == (n_layers, n_post, 16)
    assert torch.tensor(rebuild["harmless_mean_sketch"]).shape == (n_layers, n_post, 16)
    again = tmp_path / "again"
    result = CliRunner().invoke(
        app, ["optimize", "--model", str(model), "--out", str(again), "--point", str(report), "--no-evaluate"]
    )
    assert result.exit_code == 0, result.output
    squeezed = "".join(result.output.split())  # rich wraps long paths anywhere
    assert "".join(f"trial {chosen.trial.number} of {report}, its chosen point".split()) in squeezed
    assert "warning" not in result.output  # the report records its directions: checked
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in again.glob("*.safetensors"))
    for name in shards:
        want, got = load_file(out / name), load_file(again / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    direction = load_direction(again / "weightedit" / "refusal_direction.safetensors")
    assert direction.profile == chosen.trial.point.profile
    assert direction.meta["optimize"]["written_from"] == {
        "report": "study/optimize.json", "trial": chosen.trial.number, "chosen": True, "checked": True
    }  # fmt: skip
    assert json.loads((again / "weightedit.json").read_text())["optimize"]["chosen"] is True

    shaped = [t for t in job.study.trials if not t.point.profile.is_full and t.point.harmless_share]
    other = shaped[0]
    third = tmp_path / "other"
    result = CliRunner().invoke(
        app,
        ["optimize", "--model", str(model), "--out", str(third), "--point", str(report),
         "--point-trial", str(other.number), "--no-evaluate"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "notitschosenpoint:nochoicerulewasappliedtoit" in "".join(result.output.split())
    assert json.loads((third / "weightedit.json").read_text())["optimize"] == {
        "trial": other.number, "study_report": "study/optimize.json", "chosen": False
    }  # fmt: skip
    direction = load_direction(third / "weightedit" / "refusal_direction.safetensors")
    assert direction.profile == other.point.profile and direction.meta["optimize"]["harmless_share"] > 0
    assert direction.layer_vectors is not None and torch.equal(
        direction.layer_vectors, job.study.direction(other.point)
    )
    trial_model, written, ids = trial_and_written(model, third)
    with torch.inference_mode():
        original = trial_model(ids).logits
        with temporarily_edited(trial_model, job.study.direction(other.point), other.point.profile):
            want_logits = trial_model(ids).logits
        got_logits = written(ids).logits
    assert (want_logits - original).abs().max() > 1e-2
    assert (got_logits - want_logits).abs().max().item() <= 1e-4


def test_a_report_without_a_rebuild_record_is_written_unchecked_and_keeps_its_full_orthogonalisation(planted, tmp_path):
    """Reports made before 2026-12-06 record no check of their directions, and those made before the share was
    recorded say orthogonal_to_harmless=true instead: the point is rebuilt with all of the harmless mean removed,
    and the command warns that the direction is unchecked."""
    model, prompts = planted
    work = tmp_path / "study"
    opts = options(prompts, trials=2, direction_scope="per-layer", orthogonal_to_harmless=True)
    job = optimize_model(str(model), tmp_path / "edited", opts, work_dir=work, progress=False)
    chosen = job.study.chosen
    assert chosen is not None and chosen.trial.point.harmless_share == 1.0
    data = json.loads((work / "optimize.json").read_text())
    del data["rebuild"], data["chosen"]["harmless_share"]
    old = tmp_path / "old" / "optimize.json"
    old.parent.mkdir()
    old.write_text(json.dumps(data))
    out = tmp_path / "again"
    result = CliRunner().invoke(
        app, ["optimize", "--model", str(model), "--out", str(out), "--point", str(old), "--no-evaluate"]
    )
    assert result.exit_code == 0, result.output
    assert "recordsnocheckofitsdirections" in "".join(result.output.split())
    direction = load_direction(out / "weightedit" / "refusal_direction.safetensors")
    assert direction.layer_vectors is not None and torch.equal(
        direction.layer_vectors, job.study.direction(chosen.trial.point)
    )
    assert direction.meta["optimize"]["written_from"]["checked"] is False


def test_a_recorded_point_round_trips_through_its_json():
    opts = OptimizeOptions(direction_scope="per-layer", preserve_norm=None, orthogonal_to_harmless=None)
    params = {"direction_layer": 2.5, "position": -1, **FULL_PROFILE, "embedding": 0.5, "preserve_norm": True, "harmless_share": 0.3}  # fmt: skip
    point = point_from_params(params, opts)
    assert EditPoint.from_json(json.loads(json.dumps(point.to_json()))) == point
    glob = point_from_params({**params, "harmless_share": 0.0}, OptimizeOptions(direction_scope="global"))
    assert EditPoint.from_json(glob.to_json()) == glob and not glob.per_layer
    bad = [
        ({"harmless_share": 1.5}, "harmless_share that is not a number from 0 to 1"),
        ({"harmless_share": "x"}, "harmless_share that is not a number from 0 to 1"),
        ({"position": 0}, "position that is not a post-instruction position"),
        ({"position": None}, "position that is not a post-instruction position"),
        ({"direction_layer": "abc"}, "direction_layer that is not a layer index"),
        ({"direction_layer": -1}, "direction_layer that is not a layer index"),
        ({"direction_scope": "rows"}, "unknown direction_scope"),
        ({"profile": {"attention": 3}}, "profile this version cannot read"),
    ]
    for change, message in bad:
        with pytest.raises(OptionsError, match=message):
            EditPoint.from_json({**point.to_json(), **change})
    with pytest.raises(OptionsError, match="must be a trial record"):
        EditPoint.from_json({"position": -1})


@pytest.fixture(scope="module")
def a_study_report(planted, tmp_path_factory):
    """A small study's optimize.json and the model it was made on."""
    model, prompts = planted
    root = tmp_path_factory.mktemp("point-report")
    optimize_model(str(model), root / "edited", options(prompts, trials=2), work_dir=root / "study", progress=False)
    return model, root / "study" / "optimize.json"


def test_bad_points_are_one_line_errors_that_write_nothing(a_study_report, tmp_path):
    model, report = a_study_report
    data = json.loads(report.read_text())
    n_layers = len(data["rebuild"]["mean_difference_sketch"])

    def variant(name, **changes):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**data, **changes}))
        return path

    chosen = data["chosen"]
    sketches = data["rebuild"]["mean_difference_sketch"]
    scaled = [[[x * 1.01 for x in v] for v in row] for row in sketches]
    rotated = [[[*v[1:], v[0]] for v in row] for row in sketches]  # same norms, another direction
    nan = [[[float("nan"), *v[1:]] for v in row] for row in sketches]
    # One harmless fit prompt of the study's 16 changed: the direction moves a little, and the check sees it.
    prompts = Path(data["options"]["prompts"])
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    first = next(r for r in rows if (r["lang"], r["kind"], r["split"]) == ("en", "harmless", "train"))
    first["instruction"] = first["instruction"] + " please"
    edited_prompts = tmp_path / "prompts.jsonl"
    edited_prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # Other weights saved under the study model's folder name in another place: the name matches, the content
    # does not.
    twin = tmp_path / "twin" / model.name
    other_weights = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        other_weights.model.norm.weight.mul_(1.5)
    other_weights.save_pretrained(twin)
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (twin / f.name).write_bytes(f.read_bytes())
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    cases = [
        ([], ["--point-trial", "1"], "--point-trial 1: picks a trial of the study report that --point names: pass both"),
        ([], ["--point", str(tmp_path / "missing.json")], f"--point {tmp_path / 'missing.json'}: cannot be read as JSON"),
        ([], ["--point", str(broken)], "cannot be read as JSON"),
        ([], ["--point", str(variant("plain", schema=None))], "is not a study report (weightedit-optimize); pass a study's optimize.json"),
        ([], ["--point", str(report), "--point-trial", "99"], f"--point-trial 99: is not a trial of {report}: use one of 0, 1"),
        ([], ["--point", str(variant("unchosen", chosen=None))], "records no chosen point (its study chose none): pick one of its trials (0, 1) with --point-trial"),
        # Without a rebuild record (an older report) the name is checked; with one, the weights (the twin below).
        ([], ["--point", str(variant("elsewhere", model="someone/else", rebuild=None))], "is a study of someone/else, not of"),
        ([], ["--point", str(report), "--trials", "5"], "--trials is a search option, and --point writes a point a study recorded without searching: drop it"),
        ([], ["--point", str(report), "--no-preserve-norm"], "--preserve-norm is a search option"),
        ([], ["--point", str(variant("position", chosen={**chosen, "position": 0}))], f"trial {chosen['trial']} has a position that is not a post-instruction position"),
        ([], ["--point", str(variant("far", chosen={**chosen, "direction_layer": n_layers + 3}))], f"outside this model's layers 0–{n_layers - 1}"),
        ([], ["--point", str(variant("scaled", rebuild={**data["rebuild"], "mean_difference_sketch": scaled}))], "% apart, more than 0.05%): the prompts, chat template or model differ from the study's"),
        ([], ["--point", str(variant("rotated", rebuild={**data["rebuild"], "mean_difference_sketch": rotated}))], "records other mean differences than those computed again"),
        ([], ["--point", str(variant("nan", rebuild={**data["rebuild"], "mean_difference_sketch": nan}))], "has a rebuild record that is not finite"),
        ([], ["--point", str(variant("no-harmless", rebuild={**data["rebuild"], "harmless_mean_sketch": None}))], "has a malformed rebuild record"),
        ([], ["--point", str(variant("listed", rebuild=[]))], "has a malformed rebuild record"),
        ([], ["--point", str(report), "--prompts", str(edited_prompts)], "records other mean differences than those computed again"),
        ([], ["--point", str(variant("n-train", options={**data["options"], "n_train": "x"}))], "records options this version cannot use"),
        ([], ["--point", str(variant("true", chosen={**chosen, "trial": True}))], "records no chosen point"),
        ([], ["--point", str(variant("dtype", rebuild={**data["rebuild"], "dtype": "bfloat16"}))], "was made in bfloat16, not float32: pass --dtype bfloat16"),
        (["--model", str(twin)], ["--point", str(variant("twin", model=f"./{model.name}"))], "is a study of other weights than"),
        ([], ["--point", str(report), "--work-dir", str(report.parent)], "is the study's folder"),
    ]  # fmt: skip
    for model_flags, flags, message in cases:
        out = tmp_path / "o"
        args = ["optimize", "--model", str(model), "--out", str(out), *flags]
        if model_flags:
            args[2] = model_flags[1]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (flags, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]  # after any progress
        assert len(errors) == 1 and message in errors[0], (flags, result.output)
        assert not out.exists() and not (tmp_path / "o-optimize").exists()
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "front.png",
        "optimize.json",
        "optimize.md",
        "study.journal",
    ]


def test_a_per_language_kl_bound_constrains_every_trial_and_bounds_the_front_and_choice(
    mlp_cost_model, planted, tmp_path
):
    """Every trial carries the Optuna constraint (highest language's KL minus the bound); the front and the judged
    points hold only trials within the bound, and the chosen point is one of them."""
    free = optimize_model(str(mlp_cost_model), tmp_path / "free", options(planted[1], trials=8), progress=False)
    highest = sorted(max(v["kl"] for v in t.per_lang.values()) for t in free.study.trials)
    bound = highest[len(highest) // 2]  # binds: half the unconstrained trials are over it, the full edit among them
    assert max(v["kl"] for v in free.study.trials[0].per_lang.values()) > bound
    work = tmp_path / "bounded-study"
    job = optimize_model(
        str(mlp_cost_model),
        tmp_path / "bounded",
        options(planted[1], trials=8, lang_kl_budget=bound),
        work_dir=work,
        progress=False,
    )
    stored = {t.number: t for t in stored_study(work).trials}
    over = []
    for t in job.study.trials:
        top = max(v["kl"] for v in t.per_lang.values())
        assert stored[t.number].constraints == {study_module.LANG_KL_CONSTRAINT: pytest.approx(top - bound)}
        if top > bound:
            over.append(t.number)
    assert 0 in over  # the full edit (trial 0) is over the bound
    assert job.study.front and not {t.number for t in job.study.front} & set(over)
    assert job.study.verified and not {v.trial.number for v in job.study.verified} & set(over)
    chosen = job.study.chosen
    assert chosen is not None and max(v["kl"] for v in chosen.trial.per_lang.values()) <= bound
    report = json.loads(job.files["json"].read_text())
    assert report["options"]["lang_kl_budget"] == report["choice"]["lang_kl_budget"] == bound
    assert f"no language's KL is over {bound:g} nats" in report["choice"]["statement"]
    # The written direction file says which prompts its per-language KLs were read on and the bound they met.
    meta = load_direction(tmp_path / "bounded" / "weightedit" / "refusal_direction.safetensors").meta["optimize"]
    assert (meta["n_kl"], meta["lang_kl_budget"]) == (8, bound)
    md = job.files["md"].read_text()
    assert f"every language's KL at most {bound:g} (the per-language bound): {8 - len(over)} of 8." in md
    # Resuming the study with another bound (or none) would steer by stale constraints: refused, naming the bound
    # it was made with; the same bound given as another number type is the same key.
    with pytest.raises(OptionsError, match=f"it was made with lang_kl_budget {bound}: resume it so"):
        optimize_model(
            str(mlp_cost_model), tmp_path / "c", options(planted[1], trials=9), work_dir=work, progress=False
        )
    assert OptimizeOptions(lang_kl_budget=1).setup_key() == OptimizeOptions(lang_kl_budget=1.0).setup_key()


def test_the_languages_over_the_bound_are_named():
    bound = OptimizeOptions(lang_kl_budget=0.1)
    trial = study_module.TrialRecord(
        3,
        None,  # type: ignore[arg-type]
        0.0,
        0.05,
        {"en": {"kl": 0.06, "refusal": 0.0}, "yo": {"kl": 0.126, "refusal": 0.0}, "th": {"kl": 0.1004}},
    )
    assert study_module.over_lang_kl(trial, bound) == ["yo KL 0.126 > 0.1", "th KL 0.1004 > 0.1"]
    assert study_module.over_lang_kl(trial, OptimizeOptions()) == []
    assert study_module.unjudged_reason([trial], bound) == (
        "no trial keeps every language's KL within <<lang_kl_budget>> 0.1 (the closest, trial 3, has yo at 0.126)"
    )
    assert study_module.over_lang_kl(dataclasses.replace(trial, per_lang={"en": {"kl": float("nan")}}), bound)


def test_no_trial_within_the_language_bound_is_an_error_that_writes_no_model(planted, tmp_path):
    result = optimize_planted(planted, tmp_path / "edited", "--langs", "en,de", "--lang-kl-budget", "1e-9")
    assert result.exit_code == 1, result.output
    assert "no trial keeps every language's KL within --lang-kl-budget 1e-09" in result.output
    assert "nothing was written" in result.output
    # The advice is the bound's, not more judged points or a higher refusal target (nothing was judged).
    assert "raise --lang-kl-budget (in another --work-dir" in result.output and "--verify" not in result.output
    assert not (tmp_path / "edited").exists()
    report = json.loads((tmp_path / "edited-optimize" / "optimize.json").read_text())
    assert report["front"] == [] and report["verified"] == [] and len(report["trials"]) == 2
    md = (tmp_path / "edited-optimize" / "optimize.md").read_text()
    assert "| language | unedited |\n|---|---|\n" in md and "**No trial is within the bound.**" in md
    assert "no point judged: no trial keeps every language's KL within the per-language bound 1e-09" in md


def test_kl_is_measured_on_n_kl_harmless_prompts_a_language(planted):
    model, prompts = planted
    loaded = load_model(str(model), ModelLoadOptions(dtype="float32"), progress=False)
    plain = prepare(loaded, options(prompts, n_score=6), progress=False)
    fewer = prepare(loaded, options(prompts, n_score=6, n_kl=4), progress=False)
    more = prepare(loaded, options(prompts, n_score=6, n_kl=8), progress=False)
    for a, b, c in zip(plain.targets, fewer.targets, more.targets, strict=True):
        assert len(a.harmful) == len(b.harmful) == len(c.harmful) == 6  # the refusal prompts do not change
        assert (len(a.harmless), len(b.harmless), len(c.harmless)) == (6, 4, 8)
        # The same list, longer or shorter: the first prompts are n_score's, and so are their baseline logprobs.
        assert b.harmless == a.harmless[:4] and c.harmless[:6] == a.harmless
        torch.testing.assert_close(c.harmless_lp[:6], a.harmless_lp, atol=1e-5, rtol=1e-5)
    assert OptimizeOptions(n_score=6, n_kl=8).setup_key()["n_kl"] == 8
    assert "n_kl" not in OptimizeOptions(n_score=6, n_kl=6).setup_key()  # n_score's own: the key of old studies
    assert "n_kl" not in OptimizeOptions().setup_key() and "lang_kl_budget" not in OptimizeOptions().setup_key()


@pytest.mark.parametrize("flag", ["--n-kl", "--n-score"])
def test_too_few_select_prompts_is_a_one_line_error_naming_the_option(planted, tmp_path, flag):
    result = optimize_planted(planted, tmp_path / "o", "--langs", "en", flag, "500")
    assert result.exit_code == 2, result.output
    assert f"500 asked; lower {flag} or add prompts" in result.output.splitlines()[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-optimize").exists()


def test_enqueued_points_run_first_once_each_and_are_marked(planted, tmp_path):
    """``enqueue``: the points run as the trials after the full edit, before the sampler draws any; a point the
    study has run (the full edit, or one enqueued before) is not run again when the study is resumed with it."""
    model, prompts = planted
    opts = options(prompts, trials=4, preserve_norm=None, orthogonal_to_harmless=None, search_space="free")
    params = {**FULL_PROFILE, "embedding": 0.25, "preserve_norm": True, "harmless_share": 0.5}
    first = point_from_params({"direction_layer": 1.5, "position": -1, **params}, opts)
    second = point_from_params({"direction_layer": 0.5, "position": -1, **params, "mlp_peak": 0.6}, opts)
    work = tmp_path / "study"
    job = optimize_model(str(model), tmp_path / "a", opts, work_dir=work, enqueue=[first, second], progress=False)
    trials = job.study.trials
    assert [t.enqueued for t in trials] == [False, True, True, False]
    assert (trials[1].point, trials[2].point) == (first, second)
    records = json.loads(job.files["json"].read_text())["trials"]
    assert [r.get("enqueued", False) for r in records] == [False, True, True, False]
    md = job.files["md"].read_text()
    assert "Trials 1 and 2 ran points given to the study (enqueued)" in md
    assert "## What removing each language's refusal cost (search estimates)" in md and "Hardest: " in md

    # Resumed with the same points and trial 0's: none runs again; the one new trial is the sampler's.
    again = [EditPoint.from_json(r) for r in records[:3]]
    resumed = optimize_model(
        str(model), tmp_path / "b", dataclasses.replace(opts, trials=5), work_dir=work, enqueue=again, progress=False
    )
    assert [t.enqueued for t in resumed.study.trials] == [False, True, True, False, False]
    # No room left for a new point: a one-line error naming --trials, and nothing is added to the study.
    third = dataclasses.replace(first, harmless_share=0.9)
    with pytest.raises(OptionsError, match="trials 5 leaves room for 0 more trials: raise trials to at least 6"):
        optimize_model(str(model), tmp_path / "c", dataclasses.replace(opts, trials=5), work_dir=work,
                       enqueue=[third], progress=False)  # fmt: skip
    assert len(stored_study(work).trials) == 5


def test_a_point_rebuilds_the_parameters_it_came_from():
    for opts, extra in [
        (OptimizeOptions(direction_scope="global", preserve_norm=None, orthogonal_to_harmless=None, search_space="free"),
         {"direction_layer": 3.25, "position": -2, "preserve_norm": True, "harmless_share": 0.3}),
        (OptimizeOptions(direction_scope="per-layer", orthogonal_to_harmless=True), {"preserve_norm": False}),
    ]:  # fmt: skip
        params = {**FULL_PROFILE, "attention_peak": 1.3, "attention_floor": 0.4, "mlp_width": 2.5, "embedding": 0.5}
        params.update(extra)
        fixed = {} if "position" in params else {"direction_layer": 2.0, "position": -1}
        point = point_from_params(params, opts, fixed)
        back = params_of(point, 6, 3, opts, Anchor(2.0, -1, True), fixed)
        assert back.keys() == params.keys()
        assert all(back[k] == pytest.approx(v) for k, v in params.items())
        assert point_from_params(back, opts, fixed) == point
    # No kernel (the full edit) or one without a width limit: the sampler's kernel of the same weights.
    opts = OptimizeOptions(direction_scope="per-layer")
    point = EditPoint(
        2.0, -1, EditProfile(attention=None, mlp=LayerKernel(center=40.0, peak=0.8, width=math.inf)), True
    )
    back = params_of(point, 6, 3, opts)
    assert {k: v for k, v in back.items() if k.startswith(("attention", "mlp"))} == {
        "attention_center": 0.0, "attention_peak": 1.0, "attention_width": 6.0, "attention_floor": 1.0,
        "mlp_center": 0.0, "mlp_peak": 0.8, "mlp_width": 6.0, "mlp_floor": 1.0,
    }  # fmt: skip
    rebuilt = point_from_params(back, opts, {"direction_layer": 2.0, "position": -1}).profile
    assert [rebuilt.attention.weight(layer) for layer in range(6)] == [1.0] * 6
    assert [rebuilt.mlp.weight(layer) for layer in range(6)] == [0.8] * 6
    # A point with no harmless share is the plain direction: share 0 where the study searches it.
    searched = OptimizeOptions(direction_scope="per-layer", orthogonal_to_harmless=None)
    assert params_of(point, 6, 3, searched)["harmless_share"] == 0.0


@pytest.mark.parametrize(
    "change, opts, message",
    [
        ({"per_layer": True}, {}, "has direction_scope 'per-layer', but this study's points have global directions"),
        ({"harmless_share": 0.5}, {}, "has harmless_share 0.5, but this study's points have harmless_share 0 (<<orthogonal_to_harmless>>)"),
        ({"position": -2}, {}, "has position -2, but this study's points have position -1, the anchor's: give the point that position, or search freely (<<search_space>> free)"),
        ({"position": -4}, {"search_space": "free"}, "has position -4, but this study's points have position from -3 to -1"),
        ({"layer": 4.9}, {}, "has direction_layer 4.9, but this study's points have direction_layer from 0.5 to 3.5 (the anchor's window: <<layer_window>>)"),
        ({"layer": 2.5}, {"layer_window": 0}, "has direction_layer 2.5, but this study's points have direction_layer 2, the anchor's (<<layer_window>> 0 fixes it)"),
        ({"attention": {"peak": 1.6}}, {}, "has attention peak 1.6, but this study's points have attention peak from 0.5 to 1.5"),
        ({"mlp": {"width": 9.0}}, {}, "has mlp width 9.0, but this study's points have mlp width from 1 to 6"),
        ({"mlp": {"center": -1.0}}, {}, "has mlp center -1.0"),
        ({"attention": {"floor": 1.2}}, {}, "has attention floor as a share of its peak 1.2"),
        ({"embedding": 1.5}, {}, "has embedding 1.5, but this study's points have embedding from 0 to 1"),
        ({"harmless_share": 1.5}, {"orthogonal_to_harmless": None}, "has harmless_share 1.5, but this study's points have harmless_share from 0 to 1"),
        ({"position": True}, {"search_space": "free"}, "has position True, but this study's points have a whole-number position"),
        ({"preserve_norm": True}, {"preserve_norm": False}, "has preserve_norm True, but this study's points have preserve_norm False (<<preserve_norm>>)"),
    ],
)  # fmt: skip
def test_a_point_out_of_the_studys_search_space_is_refused(change, opts, message):
    settings = {"direction_scope": "global", **opts}
    study_opts = OptimizeOptions(**settings)
    base = {**FULL_PROFILE, "embedding": 1.0, "direction_layer": 2.0, "position": -1}
    point = point_from_params({**base, "preserve_norm": False, "harmless_share": 0.0}, study_opts)
    profile = point.profile
    for part in ("attention", "mlp"):
        if part in change:
            profile = dataclasses.replace(
                profile, **{part: dataclasses.replace(getattr(profile, part), **change[part])}
            )
    if "embedding" in change:
        profile = dataclasses.replace(profile, embedding=change["embedding"])
    if "preserve_norm" in change:
        profile = dataclasses.replace(profile, preserve_norm=change["preserve_norm"])
    rest = {k: v for k, v in change.items() if k in ("per_layer", "harmless_share", "position", "layer")}
    point = dataclasses.replace(point, profile=profile, **rest)
    anchor = Anchor(2.0, -1, True)  # 6 layers, limit 0.8 · 5 = 4: the window of 1.5 is 0.5–3.5
    with pytest.raises(OptionsError, match="^enqueue=") as e:
        params_of(point, 6, 3, study_opts, anchor, fixed_params(6, study_opts, anchor))
    assert message in e.value.problem


def test_a_bad_enqueue_file_is_a_one_line_error_that_writes_nothing(a_study_report, tmp_path):
    model, report = a_study_report
    trials = json.loads(report.read_text())["trials"]
    cases = [
        ("missing", None, "cannot be read as JSON"),
        ("report", {"trials": trials}, "is a study report, not a list of points: take the trials to run from it"),
        ("empty", [], "must hold a non-empty JSON list of trial records"),
        ("record", [trials[0], {"position": -1}], "record 1: must be a trial record"),
        ("scope", [{**trials[0], "direction_scope": "per-layer"}], "has direction_scope 'per-layer', but this study's points have global directions"),
    ]  # fmt: skip
    for name, content, message in cases:
        path = tmp_path / f"{name}.json"
        if content is not None:
            path.write_text(json.dumps(content))
        out = tmp_path / "o"
        result = optimize_planted(
            (model, Path(json.loads(report.read_text())["options"]["prompts"])), out, "--direction-scope", "global",
            "--enqueue", str(path),
        )  # fmt: skip
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        where = "--enqueue point 0:" if name == "scope" else f"--enqueue {path}:"
        assert len(errors) == 1 and where in errors[0] and message in errors[0], (name, result.output)
        assert not out.exists() and not (tmp_path / "o-optimize").exists()


def test_points_a_study_has_run_or_waits_with_are_not_enqueued_again():
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    a, b, c, d = {"x": 0.1}, {"x": 0.2}, {"x": 0.3}, {"x": 0.4}
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(params=a, distributions=dist, values=[0.0, 0.0]))
    study.add_trial(optuna.trial.create_trial(params=b, distributions=dist, state=optuna.trial.TrialState.FAIL))
    study.enqueue_trial(c)
    # Run (a) or waiting (c): not again; failed (b): again; within float rounding of a new one (d): once.
    assert study_module._new_points(study, [a, b, c, d, {"x": 0.4 + 1e-12}], 5, None) == [b, d]
    # Room: 4 trials hold the complete and the waiting one, so one more.
    with pytest.raises(OptionsError, match="trials 3 leaves room for 1 more trials: raise trials to at least 4"):
        study_module._new_points(study, [b, d], 3, None)
    # A new study's trial 0 (the full edit, about to be enqueued) counts as waiting.
    fresh = optuna.create_study(directions=["minimize", "minimize"])
    assert study_module._new_points(fresh, [a, b], 3, a) == [b]
    with pytest.raises(OptionsError, match="trials 2 leaves room for 1 more trials"):
        study_module._new_points(fresh, [b, c], 2, a)


def test_enqueued_points_in_the_anchored_per_layer_search(planted, tmp_path):
    """The default search: a point at the anchor's position runs as given; one at another position, or more points
    than the trials leave room for in a new study, is a one-line exit-2 error that leaves no study behind."""
    model, prompts = planted
    opts = options(prompts, trials=1, langs=("en",), direction_scope="per-layer")
    work = tmp_path / "study"
    first = optimize_model(str(model), tmp_path / "a", opts, work_dir=work, progress=False).study.trials[0].point
    lower = dataclasses.replace(
        first, profile=dataclasses.replace(first.profile, mlp=LayerKernel(center=1.0, peak=0.7, width=2.0, floor=0.2))
    )
    job = optimize_model(
        str(model), tmp_path / "b", dataclasses.replace(opts, trials=2), work_dir=work, enqueue=[lower], progress=False
    )
    assert job.study.trials[1].enqueued and job.study.trials[1].point == lower

    elsewhere = dataclasses.replace(lower, position=-2 if first.position == -1 else -1)
    cases = [
        ("room", [lower, dataclasses.replace(lower, profile=dataclasses.replace(lower.profile, embedding=0.5))], "2",
         "--enqueue 2 new points: the study has not run them, but --trials 2 leaves room for 1 more trials: raise --trials to at least 3"),
        ("position", [elsewhere], "3", f"--enqueue point 0: has position {elsewhere.position}, but this study's points have position {first.position}, the anchor's"),
    ]  # fmt: skip
    for name, points, trials, message in cases:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([p.to_json() for p in points]))
        out = tmp_path / name
        result = optimize_planted(planted, out, "--langs", "en", "--trials", trials, "--enqueue", str(path))
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (name, result.output)
        assert not out.exists() and not (tmp_path / f"{name}-optimize").exists()


def test_the_report_names_what_each_languages_refusal_cost_and_the_hardest():
    """Per refusing language: its lowest KL among the trials whose estimate passes the rule's test of one language
    (interval: Wilson lower end; strict: the estimate), and the lowest estimate within the per-language bound."""
    from weightedit.optimize.report import _costs

    def trial(number, **langs):
        return {"trial": number, "languages": {k: {"kl": kl, "refusal": r} for k, (kl, r) in langs.items()}}

    data = {
        "choice": {"rule": "interval", "target_refusal": 0.0625, "lang_kl_budget": 0.15},
        "refusing_languages": ["en", "yo", "ar"],
        "n_per_language": {lang: {"harmful": 8, "harmless": 8} for lang in ("en", "yo", "ar")},
        "trials": [
            trial(0, en=(0.30, 0.0), yo=(0.20, 0.0), ar=(0.01, 0.5)),
            trial(1, en=(0.02, 0.0), yo=(0.05, 0.25), ar=(0.01, 0.25)),  # yo 2/8: Wilson lower end 7.1%, fails
            trial(2, en=(0.04, 0.0), yo=(0.10, 0.125), ar=(0.01, 0.25)),  # yo 1/8: lower end 2.2%, passes
        ],
    }
    lines, hardest = _costs(data)
    rows = {line.split(" |")[0][2:]: line for line in lines if line.startswith("| ") and "(" in line.split(" |")[0]}
    assert hardest == "ar"  # never passes
    assert "| 0.020 (trial 1) | 0.050 (yo) | 0% (trial 1) |" in rows["English (en)"]
    assert "| 0.100 (trial 2) | 0.040 (en) | 12% (trial 2) |" in rows["Yoruba (yo)"]
    assert "never (lowest estimate 25%, trial 1)" in rows["Arabic (ar)"] and "25% (trial 1) |" in rows["Arabic (ar)"]
    assert any("Hardest: Arabic (ar), which passed in no trial." in line for line in lines)
    # The strict rule holds the estimate itself to the target: Yoruba's 1/8 no longer passes, only trial 0's 0/8.
    data["choice"]["rule"] = "strict"
    data["trials"][1]["languages"]["ar"]["refusal"] = 0.0
    lines, hardest = _costs(data)
    assert hardest == "yo"
    assert any("Hardest: Yoruba (yo), which passed only at KL 0.200 or more in it." in line for line in lines)
    assert any(line.startswith("| Yoruba (yo) | 0.200 (trial 0) | 0.300 (en) |") for line in lines)
    # One language: no other language's KL to name.
    only = {**data, "refusing_languages": ["en"], "trials": [trial(0, en=(0.3, 0.0))]}
    assert any(line.startswith("| English (en) | 0.300 (trial 0) | — |") for line in _costs(only)[0])
