"""Options: checked where they are defined, one spelling and one default per command-line flag, and the
README's stated defaults are the ones the commands use."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from weightedit.cli.main import app
from weightedit.defence import DefenceOptions, Reextract
from weightedit.edit.options import TiedEmbeddings, tied_embeddings_option
from weightedit.errors import EvaluationError, OptionsError
from weightedit.evaluation.runner import EvalOptions
from weightedit.runtime.options import Dtype, ModelLoadOptions

README = Path(__file__).resolve().parents[1] / "README.md"

# Options whose default differs between commands on purpose, and why.
PER_COMMAND = {
    "--out": "each command writes its own kind of output",
    "--model": "required, or the checkpoint folder of push/card",
    # A direction is computed from one language by default; the commands that measure cover every language.
    "--langs": "direction: en; evaluate, compare-directions, verify-defence, demo: all; optimize: en (each language "
    "costs every trial a pass)",
    "--repo-id": "required by push; optional (push after the edit) in orthogonalize; the card's title in card",
    "--direction-lang": "orthogonalize takes it or --direction FILE, so it has none; verify-defence attacks in en",
    "--limit": "prompts per language: a full evaluation (32), an attack battery per language (16), the demo (12)",
}
# The demo runs the whole pipeline on a CPU within its time budget, with its own smaller settings.
QUICK = {"demo"}


def _commands() -> dict[str, Any]:
    """The commands as the command-line library sees them (typer builds them on click)."""
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "option"


def _options() -> dict[str, dict[str, Any]]:
    """For each flag, the option of every command that has it (hidden aliases left out)."""
    found: dict[str, dict[str, Any]] = {}
    for name, command in _commands().items():
        for param in command.params:
            if _is_option(param) and not param.hidden:
                found.setdefault(param.opts[0], {})[name] = param
    return found


def _help(*args: str) -> str:
    return CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "240"}).output


def _default(param: Any) -> object:
    value = param.default
    return value.value if hasattr(value, "value") else value


def test_one_default_per_option_across_commands():
    for flag, by_command in _options().items():
        if flag in PER_COMMAND:
            continue
        defaults = {name: _default(p) for name, p in by_command.items() if name not in QUICK}
        assert len(set(map(repr, defaults.values()))) <= 1, f"{flag} has different defaults: {defaults}"


def test_options_declared_alike_are_declared_once():
    """A flag with the same declaration in two commands belongs in cli/_options.py, defined there once."""
    import ast

    cli = Path(__file__).resolve().parents[1] / "src" / "weightedit" / "cli"
    seen: dict[str, list[str]] = {}
    for path in sorted(cli.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Option" and node.args:
                seen.setdefault(ast.unparse(node), []).append(path.name)
    repeated = {declaration: files for declaration, files in seen.items() if len(files) > 1}
    assert not repeated, repeated


def test_shared_defaults_written_out_are_the_library_defaults():
    from weightedit.cli._options import MAX_NEW_TOKENS

    assert EvalOptions().max_new_tokens == MAX_NEW_TOKENS


def test_readme_states_the_defaults_the_commands_use():
    """Every "`--flag` (value)" and "`--flag value` (default)" in the README is the flag's default everywhere."""
    text = README.read_text(encoding="utf-8")
    stated = re.findall(r"`(--[a-z-]+)` \(([\w.-]+)\)", text)
    stated += [(flag, value) for flag, value in re.findall(r"`(--[a-z-]+) ([\w.-]+)` \(default\)", text)]
    stated += [("--check-generations", n) for n in re.findall(r"at least one of (\d+) greedy", text)]
    assert len(stated) >= 3, stated
    options = _options()
    for flag, value in stated:
        assert flag in options, flag
        for name, param in options[flag].items():
            if name in QUICK:
                continue
            assert str(_default(param)) == value, f"README says {flag} defaults to {value}; {name} uses {param.default}"


def test_old_spellings_are_accepted_and_hidden():
    commands = _commands()
    hidden = {(name, p.opts[0]) for name, c in commands.items() for p in c.params if _is_option(p) and p.hidden}
    assert {("direction", "--lang"), ("orthogonalize", "--push-to"), ("push", "--revision")} <= hidden
    runner = CliRunner()
    help_text = _help("direction")
    assert "--langs" in help_text and not re.search(r"--lang\b(?!s)", help_text)
    # Both spellings reach the same check: an unknown language is refused before anything is loaded.
    for flag in ("--langs", "--lang"):
        result = runner.invoke(app, ["direction", "--model", "x", flag, "xx", "--out", "d.safetensors"])
        assert result.exit_code == 2 and "available languages are" in result.output, result.output


def test_choices_are_enums_shown_in_help():
    runner = CliRunner()
    text = _help("orthogonalize")
    assert "untie|edit-both" in text and "fast|thorough" in text and "auto|float32|bfloat16|float16" in text
    result = runner.invoke(app, ["direction", "--model", "x", "--search", "thorough!", "--out", "d.safetensors"])
    assert result.exit_code == 2 and "thorough!" in result.output


def test_eval_options_declare_what_their_cache_key_depends_on():
    fields = {f.name for f in dataclasses.fields(EvalOptions)}
    measured, not_measured = set(EvalOptions.MEASURED), set(EvalOptions.NOT_MEASURED)
    assert not measured & not_measured
    assert measured | not_measured == fields, "a new EvalOptions field must be declared in MEASURED or NOT_MEASURED"
    key = EvalOptions().key()
    assert set(key) == measured
    assert EvalOptions(batch_size=3, judge="score").key() == key  # how it runs or is judged: same cache entry
    assert EvalOptions(limit=5).key() != key


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: EvalOptions(limit=0), "limit"),
        (lambda: EvalOptions(generate=-1), "generate"),
        (lambda: EvalOptions(dtype="float8"), "dtype"),
        (lambda: ModelLoadOptions(dtype="bf16"), "dtype"),
        (lambda: DefenceOptions(langs=("en",), threshold=0), "threshold"),
        (lambda: DefenceOptions(langs=("en",), attack_candidates=0), "attack_candidates"),
        (lambda: DefenceOptions(langs=("en",), reextract="sideways"), "reextract"),
        (lambda: tied_embeddings_option("untied"), "tied_embeddings"),
    ],
)
def test_options_are_checked_on_construction(make, option):
    with pytest.raises(OptionsError) as raised:
        make()
    assert raised.value.option == option


def test_option_values_become_enums():
    assert ModelLoadOptions(dtype="float32").dtype is Dtype.FLOAT32
    assert ModelLoadOptions(chat_template=Path("t.jinja")).chat_template == "t.jinja"
    assert tied_embeddings_option("edit-both") is TiedEmbeddings.EDIT_BOTH
    assert DefenceOptions(langs=("en",), reextract="site").reextract is Reextract.SITE
    with pytest.raises(EvaluationError, match="unknown judge"):
        EvalOptions(judge="regex")
    with pytest.raises(EvaluationError, match="unknown split"):
        EvalOptions(split="tset")


def test_library_errors_name_options_not_flags():
    """Library messages mark options by their library names; only the command line turns them into flags."""
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "weightedit"
    found = []
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts:
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            call = node.exc if isinstance(node, ast.Raise) else node.value if isinstance(node, ast.Return) else None
            if isinstance(call, ast.Call) and str(getattr(call.func, "id", getattr(call.func, "attr", ""))).endswith(
                "Error"
            ):
                for line in lines[node.lineno - 1 : node.end_lineno]:
                    # A whole command to run ("weightedit direction --model ...") is a hint, not an option.
                    if re.search(r"--[a-z]", re.sub(r"weightedit \w+ --[\w-]+", "", line)):
                        found.append(f"{path.name}: {line.strip()}")
    assert not found, found


def test_the_command_line_words_errors_with_its_flags():
    from weightedit.cli._messages import cli_message
    from weightedit.errors import OutputExistsError

    error = OutputExistsError("<<out>> /x already exists: pass <<overwrite>> to replace it", path="/x", option="out")
    assert str(error) == "out /x already exists: pass overwrite to replace it"
    assert cli_message(error) == "--out /x already exists: pass --overwrite to replace it"
    assert isinstance(error, FileExistsError) and error.path == "/x"
    assert cli_message(OptionsError("kl_threshold", 0, "must be positive")) == "--max-kl 0: must be positive"
