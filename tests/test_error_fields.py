"""Errors carry the file, folder or option they are about (``path``, ``option``, ``value``), not only a message.

Each test provokes a real error through the library's public functions and checks its fields, so that a caller
can act on an error (show the file, highlight the option) without parsing its text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightedit.card import CardError, find_report
from weightedit.direction.options import SelectionOptions
from weightedit.edit.direction_file import load_direction
from weightedit.errors import (
    ChatTemplateError,
    EvaluationError,
    InvalidCheckpointError,
    InvalidDirectionError,
    ModelNotFoundError,
    OptionsError,
    OutputExistsError,
    PromptsError,
    RecipeError,
    UnsafeOutputError,
)
from weightedit.evaluation.judge_file import judge_file, read_rows
from weightedit.evaluation.runner import EvalOptions, load_eval_data
from weightedit.io.atomic import check_output_file, check_output_path
from weightedit.io.checkpoint import Checkpoint, read_header
from weightedit.prompts import load_prompts, parse_languages
from weightedit.runtime.modeling import load_model
from weightedit.runtime.options import ModelLoadOptions
from weightedit.sources import resolve_model
from weightedit.sources.recipes import list_recipes

from helpers import strip_chat_template
from tiny_models import make_tokenizer


@pytest.fixture()
def model_copy(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoints("llama"), folder)
    return folder


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


# Checkpoints and model sources


def test_truncated_shard_names_the_file(model_copy):
    shard = _first_shard(model_copy)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InvalidCheckpointError, match="is truncated") as info:
        read_header(shard)
    assert info.value.path == shard
    with pytest.raises(InvalidCheckpointError, match="is truncated") as info:
        Checkpoint.open(model_copy)
    assert info.value.path == shard
    assert info.value.option is None


def test_corrupted_index_names_the_index(model_copy):
    index = model_copy / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(InvalidCheckpointError) as info:
        Checkpoint.open(model_copy)
    assert info.value.path == index


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        Checkpoint.open(missing)
    assert info.value.path == missing
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(str(missing))
    assert info.value.path == missing
    assert (info.value.option, info.value.value) == ("model", str(missing))


def test_folder_without_config(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json") as info:
        resolve_model(folder)
    assert info.value.path == folder


def test_gguf_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(InvalidCheckpointError, match="not a GGUF file") as info:
        resolve_model(fake, progress=False)
    assert Path(info.value.path).resolve() == fake.resolve()


def test_gguf_file_missing_from_the_folder(model_copy):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(model_copy, gguf_file="absent.gguf")
    assert info.value.path == model_copy / "absent.gguf"
    assert (info.value.option, info.value.value) == ("gguf_file", "absent.gguf")


def test_malformed_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    bad = folder / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    monkeypatch.setenv("WEIGHTEDIT_RECIPES", str(folder))
    with pytest.raises(RecipeError, match="not valid YAML") as info:
        list_recipes()
    assert info.value.path == bad


def test_model_without_a_chat_template(model_copy, tmp_path):
    make_tokenizer().save_pretrained(model_copy)
    strip_chat_template(model_copy)
    with pytest.raises(ChatTemplateError, match="has no chat template") as info:
        load_model(model_copy, progress=False)
    assert info.value.path == model_copy.resolve()
    missing = tmp_path / "absent.jinja"
    with pytest.raises(ChatTemplateError, match="does not exist") as info:
        load_model(model_copy, ModelLoadOptions(chat_template=missing), progress=False)
    assert info.value.path == missing
    assert (info.value.option, info.value.value) == ("chat_template", str(missing))


# Prompts


def test_prompts_file_with_a_bad_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"instruction": "a", "kind": "harmful", "lang": "en"}\n{oops\n', encoding="utf-8")
    with pytest.raises(PromptsError, match="line 2") as info:
        load_prompts(path, "harmful", "en")
    assert info.value.path == path


def test_prompts_row_without_an_instruction(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text_missing": "a"}\n', encoding="utf-8")
    with pytest.raises(PromptsError, match="no instruction column") as info:
        load_prompts(path, "harmful", "en")
    assert info.value.path == path


def test_missing_prompt_source(tmp_path):
    missing = tmp_path / "none.jsonl"
    with pytest.raises(PromptsError, match="does not exist") as info:
        load_prompts(str(missing), "harmful", "en")
    assert info.value.path == missing
    assert (info.value.option, info.value.value) == ("prompts", str(missing))


def test_unknown_language_names_its_option():
    with pytest.raises(PromptsError) as info:
        parse_languages("en,xx")
    assert (info.value.option, info.value.value) == ("langs", "en,xx")
    with pytest.raises(PromptsError) as info:
        parse_languages("xx", option="direction_lang")
    assert info.value.option == "direction_lang"


# Direction files


def test_direction_file_that_is_not_a_vector(tmp_path):
    path = tmp_path / "matrix.safetensors"
    save_file({"direction": torch.zeros(4, 4)}, str(path))
    with pytest.raises(InvalidDirectionError, match="must be a vector") as info:
        load_direction(path)
    assert info.value.path == path


def test_missing_direction_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(InvalidDirectionError, match="does not exist") as info:
        load_direction(path)
    assert info.value.path == path


# Judge files


def test_judge_file_row_without_a_response(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text('{"lang": "en"}\n', encoding="utf-8")
    with pytest.raises(PromptsError, match="missing field 'response'") as info:
        read_rows(path)
    assert info.value.path == path


def test_judge_file_missing_input(tmp_path):
    missing = tmp_path / "none.jsonl"
    with pytest.raises(PromptsError, match="does not exist") as info:
        judge_file(missing, tmp_path / "judged.jsonl")
    assert info.value.path == missing
    assert info.value.option == "input"


def test_judge_file_output_over_its_input(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text('{"lang": "en", "response": "I cannot help with that."}\n', encoding="utf-8")
    with pytest.raises(UnsafeOutputError) as info:
        judge_file(path, path, overwrite=True)
    assert info.value.path == path
    assert info.value.option == "out"


# Options


def test_options_error_carries_option_and_value():
    with pytest.raises(OptionsError) as info:
        SelectionOptions(n_train=0)
    assert (info.value.option, info.value.value) == ("n_train", 0)
    with pytest.raises(OptionsError) as info:
        EvalOptions(limit=0)
    assert (info.value.option, info.value.value) == ("limit", 0)


def test_evaluation_options_name_the_option():
    with pytest.raises(EvaluationError) as info:
        EvalOptions(split="dev")
    assert (info.value.option, info.value.value) == ("split", "dev")
    with pytest.raises(EvaluationError) as info:
        EvalOptions(judge="oracle")
    assert (info.value.option, info.value.value) == ("judge", "oracle")


def test_perplexity_folder_without_the_language(tmp_path):
    with pytest.raises(EvaluationError, match="for perplexity") as info:
        load_eval_data("en", EvalOptions(ppl_source=str(tmp_path)))
    assert info.value.path == tmp_path / "en.jsonl"
    assert (info.value.option, info.value.value) == ("ppl_source", str(tmp_path))


# Outputs and reports


def test_existing_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="already exists") as info:
        check_output_path(out)
    assert info.value.path == out.resolve()
    assert info.value.option == "out"


def test_output_inside_the_input(model_copy):
    with pytest.raises(UnsafeOutputError, match="overlaps the input") as info:
        check_output_path(model_copy / "sub", inputs=(model_copy,), overwrite=True)
    assert info.value.path == (model_copy / "sub").resolve()
    assert info.value.option == "out"


def test_output_file_that_is_a_folder(tmp_path):
    with pytest.raises(OutputExistsError, match="is a folder") as info:
        check_output_file(tmp_path)
    assert (info.value.path, info.value.option) == (tmp_path.resolve(), "out")


def test_report_that_is_not_a_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"schema": "something/else"}), encoding="utf-8")
    with pytest.raises(CardError, match="not a weightedit evaluation report") as info:
        find_report(tmp_path / "model", report)
    assert info.value.path == report
