"""``weightedit push``, ``weightedit card`` and ``orthogonalize --push-to`` against a Hub on 127.0.0.1.

The Hub is :mod:`fake_hub`: a real HTTP server answering the endpoints huggingface_hub calls, so the real
``huggingface_hub`` and ``weightedit`` code runs end to end (create repo, branch, listing, preupload, LFS batch
and upload, NDJSON commit, file download) without any mock.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

import weightedit.hub
from weightedit.card import build_card
from weightedit.cli.main import app
from weightedit.edit.direction_file import Direction, save_direction
from weightedit.edit.rewrite import orthogonalize_checkpoint
from weightedit.evaluation.report import SCHEMA

from fake_hub import READ_TOKEN, FakeHub, running_hub, use_hub
from helpers import folder_hashes
from report_fixtures import write_synthetic_report
from tiny_models import random_direction

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "src" / "weightedit" / "evaluation" / "report.schema.json"
HUB_SOURCE = {
    "model": "meta-llama/Llama-3.2-1B-Instruct",
    "kind": "hub",
    "revision": "9213176726f574b556790deb65791e0c5aa438b6",
    "license": "llama3.2",
}
TAGS = ["weightedit", "refusal-direction", "orthogonalization", "safety-research"]
PLOTS = ["perplexity_ratio.png", "refusal.png"]


# ---------------------------------------------------------------------------------------------------------
# Inputs: edited checkpoints and an evaluation report
# ---------------------------------------------------------------------------------------------------------


def _direction() -> Direction:
    return Direction(vector=random_direction(), layer=1, position=-1, languages=("en", "de"))


@pytest.fixture()
def hub_server(tmp_path, monkeypatch):
    """The fake Hub on 127.0.0.1, with HF_ENDPOINT, HF_TOKEN (alice, write), HF_HOME and HF_HUB_OFFLINE=0 set."""
    with running_hub(tmp_path, monkeypatch) as hub:
        yield hub


@pytest.fixture(scope="module")
def edited_checkpoints(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """``local``: a local input whose card says ``license: apache-2.0``; ``hub``: provenance of a Hub model."""
    root = tmp_path_factory.mktemp("hub-edited")
    source = root / "source"
    shutil.copytree(tiny_checkpoints("llama"), source)
    # The base model's card names its languages; the edit's card takes them from there (not from what was
    # evaluated, en and de).
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\n---\n# the base model\n")
    local = orthogonalize_checkpoint(source, root / "local", _direction(), progress=False).out
    hub = orthogonalize_checkpoint(
        source, root / "hub", _direction(), progress=False, extra_provenance={"source": HUB_SOURCE}
    ).out
    return {"local": local, "hub": hub}


@pytest.fixture()
def model(edited_checkpoints, tmp_path) -> Path:
    """A private copy of the locally-sourced edited checkpoint."""
    return Path(shutil.copytree(edited_checkpoints["local"], tmp_path / "edited"))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A report folder as ``weightedit evaluate --out`` writes it (report.json/.md and two plots)."""
    out = tmp_path_factory.mktemp("hub-report") / "report"
    write_synthetic_report(out, {"en": (8, 0, 0.012, 1.025), "de": (7, 1, 0.02, 1.025)}, n=8)
    jsonschema.validate(json.loads((out / "report.json").read_text()), json.loads(SCHEMA_PATH.read_text()))
    assert json.loads((out / "report.json").read_text())["schema"] == SCHEMA
    assert sorted(p.name for p in out.glob("*.png")) == PLOTS
    return out


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def invoke(*args) -> tuple[int, str, str]:
    """Run the CLI: exit code, stdout + stderr, stdout; an unexpected exception is re-raised as it is."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output, result.stdout


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n"), card_text[:200]
    return yaml.safe_load(card_text.split("---", 2)[1])


def assert_mirrors(hub: FakeHub, repo_id: str, folder: Path, *, branch: str = "main", extra: set[str] = frozenset()):
    """Every file of ``folder`` is on the Hub byte for byte; the Hub holds nothing else but ``extra``."""
    remote = hub.files(repo_id, branch)
    local = local_files(folder)
    assert set(remote) == set(local) | {".gitattributes", "README.md"} | set(extra)
    for path, data in local.items():
        assert sha256(remote[path]) == sha256(data), path


def assert_weights_went_through_lfs(hub: FakeHub, repo_id: str, folder: Path, branch: str = "main") -> None:
    uploaded = {u["oid"] for u in hub.lfs_uploads if u["repo"] == repo_id}
    committed = {p: kind for c in hub.commits if c["repo"] == repo_id for p, kind in c["files"].items()}
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert sha256((folder / name).read_bytes()) in uploaded, name
        assert committed[name] == "lfs" and name in hub.lfs_paths(repo_id, branch)
    assert committed["config.json"] == "regular" and committed["weightedit.json"] == "regular"


def assert_failed(code: int, output: str, *expected: str) -> None:
    assert code == 2, output
    for text in expected:
        assert text in output, output
    assert output.count("error:") == 1, output


# ---------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------


def test_push_uploads_every_file_unchanged_with_the_generated_card(model, hub_server):
    hub = hub_server
    before = folder_hashes(model)
    code, output, stdout = invoke("push", "--model", model, "--repo-id", "alice/edited", "--json")
    assert code == 0, output
    result = json.loads(stdout)
    assert result["repo_id"] == "alice/edited" and result["revision"] == "main"
    assert result["commit_url"] == f"{hub.url}/alice/edited/commit/{hub.head('alice/edited')}"
    assert set(result["files"]) == set(local_files(model)) | {"README.md"}

    assert_mirrors(hub, "alice/edited", model)
    assert_weights_went_through_lfs(hub, "alice/edited", model)
    assert [c["visibility"] for c in hub.create_calls] == ["public"] and not hub.repos["alice/edited"].private
    assert not any("xet" in r.path for r in hub.requests)  # classic LFS, never Xet
    assert len(hub.commits) == 1 and hub.commits[0]["summary"] == "Upload edited (edited with weightedit)"

    # The card is the generated one, and huggingface_hub reads it back from the Hub.
    readme = hub.files("alice/edited")["README.md"].decode()
    assert readme == str(build_card(model, repo_id="alice/edited"))
    card = ModelCard.load("alice/edited")
    assert card.data.license == "apache-2.0"  # inherited from the input's card
    assert card.data.language == ["en", "fr"]  # the base model's languages
    assert card.data.tags == TAGS
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local folder is no Hub model
    meta = front_matter(readme)
    assert "base_model" not in meta and meta["model_name"] == "edited" and meta["license"] == "apache-2.0"
    assert "# alice/edited" in readme and "No evaluation report was attached" in readme

    # Pushing never changes the local folder.
    assert folder_hashes(model) == before
    assert not (model / "README.md").exists()


def test_card_names_the_hub_base_model_and_its_license(edited_checkpoints, hub_server):
    folder = edited_checkpoints["hub"]
    before = folder_hashes(folder)
    code, output, _ = invoke("push", "--model", folder, "--repo-id", "weightedit-org/llama-ortho")
    assert code == 0, output
    assert "pushed" in output and "weightedit-org/llama-ortho@main" in output
    assert_mirrors(hub_server, "weightedit-org/llama-ortho", folder)
    readme = hub_server.files("weightedit-org/llama-ortho")["README.md"].decode()
    meta = front_matter(readme)
    assert meta["base_model"] == HUB_SOURCE["model"] and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "llama3.2" and "language" not in meta  # the Hub base's languages are not recorded
    assert meta["tags"] == TAGS and meta["pipeline_tag"] == "text-generation"
    card = ModelCard(readme)
    assert card.data.base_model == HUB_SOURCE["model"]
    assert f"| base model | {HUB_SOURCE['model']} (hub) |" in readme
    assert f"| base revision | {HUB_SOURCE['revision']} |" in readme
    assert folder_hashes(folder) == before


def test_push_with_report_uploads_the_plots_and_embeds_them(model, report_dir, hub_server):
    before, report_before = folder_hashes(model), folder_hashes(report_dir)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited", "--report", report_dir)
    assert code == 0, output
    report_files = {f"weightedit-report/{n}" for n in [*PLOTS, "report.json", "report.md"]}
    assert_mirrors(hub_server, "alice/edited", model, extra=report_files)
    remote = hub_server.files("alice/edited")
    for path in report_files:
        assert remote[path] == (report_dir / Path(path).name).read_bytes(), path
    assert {f"weightedit-report/{n}" for n in PLOTS} <= hub_server.lfs_paths("alice/edited")  # binary: LFS

    readme = remote["README.md"].decode()
    for name in PLOTS:
        assert f"![weightedit-report/{name}](weightedit-report/{name})" in readme
    assert (
        "| language | n | refusal before | refusal after | McNemar p | KL [95% CI] | perplexity ratio [95% CI] |"
        in readme
    )
    assert "| English (en) | 8 | 100% [68–100%] (8/8) | 0% [0–32%] (0/8) | 0.0078 | 0.012 [" in readme
    assert "| German (de) | 8 | 88% [53–98%] (7/8) | 12% [2–47%] (1/8) |" in readme
    assert "Nothing was measured" not in readme
    assert front_matter(readme)["language"] == ["en", "fr"]
    assert folder_hashes(model) == before and folder_hashes(report_dir) == report_before


def test_push_to_a_branch_of_a_private_repo(model, hub_server):
    hub = hub_server
    code, output, stdout = invoke(
        "push", "--model", model, "--repo-id", "alice/edited", "--revision", "ortho-v1", "--private", "--json"
    )
    assert code == 0, output
    assert json.loads(stdout)["revision"] == "ortho-v1"
    assert [c["visibility"] for c in hub.create_calls] == ["private"] and hub.repos["alice/edited"].private
    assert [r.status for r in hub.calls("create_branch")] == [200]
    assert_mirrors(hub, "alice/edited", model, branch="ortho-v1")
    assert_weights_went_through_lfs(hub, "alice/edited", model, branch="ortho-v1")
    assert set(hub.files("alice/edited", "main")) == {".gitattributes"}
    assert [c["branch"] for c in hub.commits] == ["ortho-v1"]

    # A second push to the existing branch: create_branch answers 409 (exist_ok), nothing new to upload.
    code, output = invoke("push", "--model", model, "--repo-id", "alice/edited", "--revision", "ortho-v1")[:2]
    assert code == 0, output
    assert [r.status for r in hub.calls("create_branch")] == [200, 409]
    assert len(hub.commits) == 1


def test_pushing_the_same_model_again_is_accepted(model, hub_server):
    hub = hub_server
    assert invoke("push", "--model", model, "--repo-id", "alice/edited")[0] == 0
    uploads, head = len(hub.lfs_uploads), hub.head("alice/edited")
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    assert code == 0, output
    # The existing weightedit.json was downloaded (hf_hub_download: HEAD then GET) and found identical...
    resolves = [(r.method, r.path.split("?")[0], r.status) for r in hub.calls("resolve")]
    assert resolves == [(m, "/alice/edited/resolve/main/weightedit.json", 200) for m in ("HEAD", "GET")]
    # ...and every file was unchanged: no upload and no new commit.
    assert len(hub.lfs_uploads) == uploads and hub.head("alice/edited") == head and len(hub.commits) == 1
    assert hub.commits[0]["repo"] == "alice/edited"


def test_card_then_push_keeps_the_report_in_the_folder(model, report_dir, hub_server):
    code, output, _ = invoke("card", "--model", model, "--report", report_dir)
    assert code == 0, output
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    assert code == 0, output
    remote = hub_server.files("alice/edited")
    assert set(remote) == set(local_files(model)) | {".gitattributes"}
    for path, data in local_files(model).items():
        if path != "README.md":  # the pushed card is titled with the repo id
            assert remote[path] == data, path
    readme = remote["README.md"].decode()
    assert "# alice/edited" in readme and "![weightedit-report/refusal.png](weightedit-report/refusal.png)" in readme
    assert folder_hashes(model) == before


# ---------------------------------------------------------------------------------------------------------
# push: errors (one line, exit code 2, nothing changed)
# ---------------------------------------------------------------------------------------------------------


def test_no_token(model, hub_server, tmp_path, monkeypatch):
    use_hub(monkeypatch, hub_server.url, tmp_path / "empty-hf-home", token=None)
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    assert_failed(code, output, "no Hugging Face token", "HF_TOKEN", "--token")
    assert hub_server.calls("create_repo") == [] and hub_server.repos == {}
    assert folder_hashes(model) == before


def test_invalid_token(model, hub_server):
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited", "--token", "hf_not_a_token")
    assert_failed(code, output, "rejected the token (401)", "HF_TOKEN")
    assert [r.status for r in hub_server.calls("create_repo")] == [401]
    assert hub_server.repos == {} and folder_hashes(model) == before


def test_token_without_write_access_to_the_namespace(model, hub_server):
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "bob/edited")
    assert_failed(code, output, "may not write to bob/edited (403)", "write token")
    assert [r.status for r in hub_server.calls("create_repo")] == [403]
    assert hub_server.repos == {} and folder_hashes(model) == before


def test_read_only_token_on_an_existing_repo(model, hub_server, monkeypatch):
    hub = hub_server
    hub.add_repo("alice/edited")
    head = hub.head("alice/edited")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    # create_repo tolerates the 403 of an existing repo; the upload itself is refused.
    assert_failed(code, output, "uploading: the token may not write to alice/edited (403)")
    assert [r.status for r in hub.calls("preupload")] == [403]
    assert hub.head("alice/edited") == head and hub.lfs_uploads == [] and hub.commits == []
    assert folder_hashes(model) == before


def _other_model() -> dict[str, bytes]:
    import torch

    weights = save_safetensors({"model.embed_tokens.weight": torch.ones(4, 4)})
    provenance = {"direction": {"sha256": "f" * 64}, "input_shards": {"model.safetensors": "0" * 64}}
    return {
        "model.safetensors": weights,
        "config.json": b'{"model_type": "llama"}\n',
        "weightedit.json": json.dumps(provenance).encode(),
    }


@pytest.mark.parametrize("with_provenance", [True, False], ids=["weightedit-model", "foreign-model"])
def test_repo_holding_a_different_model_needs_force(model, hub_server, with_provenance):
    hub = hub_server
    files = _other_model()
    if not with_provenance:
        del files["weightedit.json"]
    hub.add_repo("alice/taken", files)
    head = hub.head("alice/taken")
    before = folder_hashes(model)

    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/taken")
    assert_failed(code, output, "alice/taken already holds a different model", "model.safetensors", "--force")
    assert hub.head("alice/taken") == head and hub.commits == [] and hub.lfs_uploads == []
    assert folder_hashes(model) == before

    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/taken", "--force")
    assert code == 0, output
    # The other model's files are replaced: none of its weights survive next to the new ones.
    assert_mirrors(hub, "alice/taken", model)
    assert hub.commits[-1]["deleted"] == ["model.safetensors"]
    assert folder_hashes(model) == before


def test_hub_unavailable(model, hub_server, monkeypatch):
    monkeypatch.setattr(weightedit.hub, "_RETRY_DELAY_S", 0.0)
    hub_server.unavailable = True
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    assert_failed(
        code, output, f"cannot reach the Hub at {hub_server.url} after 3 attempts", "nothing local was changed"
    )
    assert [r.status for r in hub_server.calls("create_repo")] == [503] * 3
    assert hub_server.repos == {} and folder_hashes(model) == before


def test_hub_down(model, hub_server, monkeypatch):
    monkeypatch.setattr(weightedit.hub, "_RETRY_DELAY_S", 0.0)
    hub_server.stop()
    before = folder_hashes(model)
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    assert_failed(code, output, f"cannot reach the Hub at {hub_server.url} after 3 attempts (ConnectError)")
    assert folder_hashes(model) == before


def test_a_transient_failure_is_retried(model, hub_server, monkeypatch):
    monkeypatch.setattr(weightedit.hub, "_RETRY_DELAY_S", 0.0)
    hub_server.failures["create_repo"] = 1
    code, output, _ = invoke("push", "--model", model, "--repo-id", "alice/edited")
    assert code == 0, output
    assert [r.status for r in hub_server.calls("create_repo")] == [503, 200]
    assert_mirrors(hub_server, "alice/edited", model)


# ---------------------------------------------------------------------------------------------------------
# card, and orthogonalize --push-to
# ---------------------------------------------------------------------------------------------------------


def test_card_writes_readme_and_copies_the_plots(model, report_dir):
    before = local_files(model)
    code, output, _ = invoke("card", "--model", model, "--report", report_dir)
    assert code == 0, output
    text = (model / "README.md").read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "fr"] and meta["tags"] == TAGS
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta
    assert ModelCard.load(model / "README.md").data.license == "apache-2.0"
    for name in [*PLOTS, "report.json", "report.md"]:
        assert (model / "weightedit-report" / name).read_bytes() == (report_dir / name).read_bytes(), name
    for name in PLOTS:
        assert f"![weightedit-report/{name}](weightedit-report/{name})" in text
    assert "| English (en) | 8 | 100% [68–100%] (8/8) | 0% [0–32%] (0/8) |" in text
    after = local_files(model)
    assert {k: v for k, v in after.items() if k in before} == before  # only README.md and the report were added
    assert set(after) - set(before) == {
        "README.md",
        *(f"weightedit-report/{n}" for n in [*PLOTS, "report.json", "report.md"]),
    }


def test_orthogonalize_push_to(tiny_checkpoints, hub_server, tmp_path):
    direction = save_direction(_direction(), tmp_path / "r.safetensors")
    out = tmp_path / "out"
    code, output, stdout = invoke(
        "orthogonalize",
        "--model",
        tiny_checkpoints("llama"),
        "--direction",
        direction,
        "--out",
        out,
        "--push-to",
        "alice/llama-ortho",
        "--private",
        "--quiet",
        "--json",
    )
    assert code == 0, output
    summary = json.loads(stdout)
    assert summary["pushed"] == f"{hub_server.url}/alice/llama-ortho/commit/{hub_server.head('alice/llama-ortho')}"
    assert [c["visibility"] for c in hub_server.create_calls] == ["private"]
    assert_mirrors(hub_server, "alice/llama-ortho", out)
    assert_weights_went_through_lfs(hub_server, "alice/llama-ortho", out)
    pushed = hub_server.files("alice/llama-ortho")["README.md"].decode()
    assert "language" not in front_matter(pushed) and "Nothing was measured" in pushed


def test_orthogonalize_push_to_without_token_fails_before_editing(tiny_checkpoints, hub_server, tmp_path, monkeypatch):
    use_hub(monkeypatch, hub_server.url, tmp_path / "empty-hf-home", token=None)
    direction = save_direction(_direction(), tmp_path / "r.safetensors")
    out = tmp_path / "out"
    code, output, _ = invoke(
        "orthogonalize",
        "--model",
        tiny_checkpoints("llama"),
        "--direction",
        direction,
        "--out",
        out,
        "--push-to",
        "alice/llama-ortho",
        "--quiet",
    )
    assert_failed(code, output, "HF_TOKEN")
    assert not out.exists() and hub_server.requests == []
