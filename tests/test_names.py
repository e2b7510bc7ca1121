"""How models are named and measured from their configs: the Hub id rule and the residual-stream width."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import GPT2Config, LlamaConfig

from weightedit.io.checkpoint import residual_width
from weightedit.sources.model import is_hub_id, public_name

IDS = [
    "gpt2",
    "Qwen/Qwen2.5-7B-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "org/name.with.dots",
    "org_1/m-2_b.c",
    "a/b",
    "123",
    "x" * 96,
    "x" * 97,
    "org/" + "y" * 96,
    "org/" + "y" * 97,
    "org/name-",
    "org/name.",
    "-org/name",
    ".hidden",
    "org/.name",
    "org/na--me",
    "org/na..me",
    "org/model.git",
    "a/b/c",
    "datasets/org/name",
    "org/",
    "/name",
    "",
    "org name",
    "org/name!",
    "./model",
    "../model",
    "~/model",
]


def _hub_accepts(text: str) -> bool:
    if not text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


@pytest.mark.parametrize("text", IDS)
def test_hub_id_rule_agrees_with_huggingface_hub(text):
    # huggingface_hub's own validator is the reference: a name it would refuse must not be sent to the Hub.
    assert is_hub_id(text) == _hub_accepts(text)


def test_public_name_keeps_hub_ids_and_hides_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert public_name("gpt2") == "gpt2"
    assert public_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert public_name("recipe:smollm2-135m-instruct") == "recipe:smollm2-135m-instruct"
    assert public_name("my-model") == "./my-model"  # exists locally: a folder, not a Hub id
    assert public_name(str(tmp_path / "my-model")) == "./my-model"
    assert public_name("org/na--me") == "./na--me"  # no Hub id, so a path
    assert public_name(None) is None


@pytest.mark.parametrize(
    ("config", "width"),
    [
        ({"hidden_size": 64}, 64),
        ({"n_embd": 48}, 48),
        ({"d_model": 32}, 32),
        ({"model_type": "gemma3", "text_config": {"hidden_size": 80}}, 80),
        ({"model_type": "x"}, None),
        ({"hidden_size": True}, None),
        (LlamaConfig(hidden_size=96, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8), 96),
        (GPT2Config(n_embd=40, n_layer=1, n_head=4), 40),
    ],
)
def test_residual_width_reads_dicts_and_configs(config, width):
    assert residual_width(config) == width
