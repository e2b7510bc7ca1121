"""A small Hugging Face Hub on 127.0.0.1 for offline tests of ``weightedit push`` / ``card`` / ``--push-to``.

It answers the endpoints that ``huggingface_hub`` really calls for those commands, so the real client code
makes real HTTP requests (nothing in ``huggingface_hub`` or ``weightedit`` is mocked):

====================================================  =====================================================
``GET  /api/agent-harnesses``                         user-agent registry (``utils/_detect_agent.py``; no auth)
``GET  /api/whoami-v2``                               ``HfApi.whoami``
``POST /api/repos/create``                            ``HfApi.create_repo``
``GET  /api/models/{repo}[/revision/{rev}]``          ``HfApi.model_info`` / ``repo_info`` (``create_repo``
                                                      with ``exist_ok`` after a 401/403; empty commits)
``GET  /api/models/{repo}/refs``                      ``HfApi.list_repo_refs`` (``create_branch`` after a 403)
``POST /api/models/{repo}/branch/{branch}``           ``HfApi.create_branch``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``       ``HfApi.list_repo_tree`` / ``list_repo_files``
``POST /api/validate-yaml``                           ``HfApi.create_commit`` checks README.md front matter
``POST /api/models/{repo}/preupload/{rev}``           ``_commit_api._fetch_upload_modes`` (regular or LFS)
``POST /{repo}.git/info/lfs/objects/batch``           ``lfs.post_lfs_batch_info`` (``basic`` transfer only)
``PUT  /lfs-upload/{oid}?ticket=...``                 ``lfs._upload_single_part`` (pre-signed, like S3)
``POST /{repo}.git/info/lfs/objects/verify``          ``lfs.lfs_upload`` verify step
``POST /api/models/{repo}/commit/{rev}``              ``_commit_api._send_commit`` (NDJSON)
``HEAD|GET /{repo}/resolve/{rev}/{path}``             ``hf_hub_download`` (``get_hf_file_metadata`` + ``http_get``)
====================================================  =====================================================

Repos live in memory (``repo -> branch -> path -> Blob``); LFS objects are keyed by SHA-256 and verified when
uploaded and when a commit references them. Every request must carry ``Authorization: Bearer <token>``
(except the agent registry and the pre-signed LFS upload URL): a missing or unknown token gets 401, a token
that may not write to the namespace gets 403. ``unavailable`` answers 503 to everything, ``failures``
answers 503 to the next N requests of a route, and ``stop()`` closes the port (connections are refused).

Xet is never used: ``huggingface_hub`` decides client-side, before asking the server anything, to upload
through Xet whenever ``hf_xet`` is installed (``_commit_api._upload_files`` checks only
``is_xet_available()``), and a Xet upload talks to a separate content-addressed store with its own binary
protocol. The fixture therefore sets ``HF_HUB_DISABLE_XET=1`` so the classic LFS ``basic`` transfer is used.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["Account", "Blob", "FakeHub", "running_hub", "use_hub", "WRITE_TOKEN", "READ_TOKEN", "BOB_TOKEN"]

WRITE_TOKEN = "hf_alice_write_0123456789"  # alice: may write to alice/* and weightedit-org/*
READ_TOKEN = "hf_alice_read_0123456789"  # alice: read-only token
BOB_TOKEN = "hf_bob_write_0123456789"  # bob: may write to bob/* only

# The Hub stores these in LFS (the default .gitattributes of a new repo), plus any binary or large file.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.zip")
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # what the Hub says (see hf_raise_for_status)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass(frozen=True)
class Account:
    """Who a token belongs to and where it may write."""

    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True

    def can_write(self, namespace: str) -> bool:
        return self.write and namespace in (self.user, *self.orgs)

    def can_read(self, namespace: str) -> bool:
        return namespace in (self.user, *self.orgs)


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """What the preupload endpoint reports (sha256 for LFS files, the git blob sha1 otherwise)."""
        return self.sha256 if self.lfs else git_blob_oid(self.data)


@dataclass
class Branch:
    files: dict[str, Blob]
    head: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, Branch] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    status: int
    user: str | None  # the account the token belongs to (None: no or unknown token)


class HubHTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), name)
    for m, p, name in [
        ("GET", r"^/api/agent-harnesses$", "agent_harnesses"),
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", rf"^/api/models/{_REPO}/refs$", "refs"),
        ("GET", rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", "tree"),
        ("GET", rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$", "model_info"),
        ("GET", rf"^/api/models/{_REPO}$", "model_info"),
        ("POST", rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$", "create_branch"),
        ("POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", "commit"),
        ("POST", r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("POST", r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify$", "lfs_verify"),
        ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
        ("GET", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
        ("HEAD", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]
]
_NO_AUTH = {"agent_harnesses", "lfs_put"}


class FakeHub:
    """An in-memory Hub served on ``127.0.0.1`` at a random free port."""

    def __init__(self, tokens: dict[str, Account] | None = None) -> None:
        self.tokens: dict[str, Account] = (
            tokens
            if tokens is not None
            else {
                WRITE_TOKEN: Account("alice", orgs=("weightedit-org",)),
                READ_TOKEN: Account("alice", orgs=("weightedit-org",), write=False),
                BOB_TOKEN: Account("bob"),
            }
        )
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.lfs_uploads: list[dict[str, Any]] = []  # every accepted LFS PUT: oid, size, repo
        self.create_calls: list[dict[str, Any]] = []  # JSON bodies of /api/repos/create
        self.commits: list[dict[str, Any]] = []  # repo, branch, oid, summary, files {path: "regular"|"lfs"}, deleted
        self.requests: list[Request] = []
        self.errors: list[str] = []  # unexpected exceptions in the server (bugs in this fake)
        self.unavailable = False  # answer 503 to everything
        self.failures: dict[str, int] = {}  # route name (see _ROUTES) -> how many more requests get a 503
        self._tickets: dict[str, tuple[str, int, str]] = {}  # ticket -> (oid, size, repo)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down and close its port: later connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state helpers for tests

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False) -> Repo:
        """A repo as the Hub creates it (``.gitattributes`` on ``main``), plus ``files`` in a second commit."""
        with self._lock:
            repo = Repo(repo_id, private)
            repo.branches["main"] = Branch({".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, _new_oid())
            self.repos[repo_id] = repo
            if files:
                branch = repo.branches["main"]
                for path, data in files.items():
                    blob = Blob(data, lfs=self._wants_lfs(branch, path, data[:512], len(data)))
                    if blob.lfs:
                        self.lfs[blob.sha256] = data
                    branch.files[path] = blob
                branch.head = _new_oid()
            return repo

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        with self._lock:
            return {p: b.data for p, b in self.repos[repo_id].branches[branch].files.items()}

    def lfs_paths(self, repo_id: str, branch: str = "main") -> set[str]:
        with self._lock:
            return {p for p, b in self.repos[repo_id].branches[branch].files.items() if b.lfs}

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].branches[branch].head

    def calls(self, name: str) -> list[Request]:
        """Requests whose path matches the route called ``name`` (see ``_ROUTES``)."""
        patterns = [p for _, p, n in _ROUTES if n == name]
        return [r for r in self.requests if any(p.match(urlsplit(r.path).path) for p in patterns)]

    # ------------------------------------------------------------------ request handling

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        account: Account | None = None
        status, out_headers, payload = 500, {}, b""
        try:
            routed = [(n, m) for meth, pattern, n in _ROUTES if meth == method and (m := pattern.match(split.path))]
            if not routed:
                raise HubHTTPError(404, f"no route for {method} {split.path}")
            name, match = routed[0]
            with self._lock:
                if self.unavailable or self.failures.get(name, 0) > 0:
                    self.failures[name] = max(0, self.failures.get(name, 0) - 1)
                    raise HubHTTPError(503, "Service Unavailable")
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            if name not in _NO_AUTH:
                account = self._authenticate(headers.get("Authorization"))
            status, out_headers, payload = getattr(self, f"_{name}")(
                account=account, body=body, query=query, headers=headers, **params
            )
        except HubHTTPError as e:
            status = e.status
            out_headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                out_headers["X-Error-Code"] = e.code
            payload = json.dumps({"error": e.message, **(e.extra or {})}).encode()
        except Exception as e:  # a bug in this fake: record it so the fixture fails the test
            self.errors.append(f"{method} {raw_path}: {type(e).__name__}: {e}")
            status, payload = 500, json.dumps({"error": "internal error"}).encode()
        with self._lock:
            self.requests.append(Request(method, raw_path, status, account.user if account else None))
        return status, out_headers, payload

    def _authenticate(self, header: str | None) -> Account:
        if not header:
            raise HubHTTPError(401, "You must be authenticated to access this resource")
        scheme, _, token = header.partition(" ")
        account = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if account is None:
            raise HubHTTPError(401, INVALID_CREDENTIALS)
        return account

    def _repo(self, repo_id: str, account: Account | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not (account and account.can_read(repo_id.split("/")[0]))):
            raise HubHTTPError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _branch(self, repo: Repo, rev: str) -> Branch:
        branch = repo.branches.get(rev)
        if branch is None:
            for b in repo.branches.values():  # a commit oid
                if b.head == rev:
                    return b
            raise HubHTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return branch

    def _writable(self, repo_id: str, account: Account) -> Repo:
        repo = self._repo(repo_id, account)
        if not account.can_write(repo_id.split("/")[0]):
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _wants_lfs(branch: Branch, path: str, sample: bytes, size: int) -> bool:
        """LFS for the patterns of the branch's ``.gitattributes``, and for any binary or large file."""
        attributes = branch.files.get(".gitattributes")
        lines = attributes.data.decode().splitlines() if attributes else []
        patterns = [line.split()[0] for line in lines if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_SIZE or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in patterns)

    # ------------------------------------------------------------------ endpoints

    def _agent_harnesses(self, **_: Any):
        return _json({"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, account: Account, **_: Any):
        role = "write" if account.write else "read"
        return _json(
            {
                "type": "user",
                "name": account.user,
                "orgs": [{"name": o, "type": "org"} for o in account.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            }
        )

    def _create_repo(self, account: Account, body: bytes, **_: Any):
        data = json.loads(body)
        with self._lock:
            self.create_calls.append({**data, "user": account.user})
        if data.get("type", "model") != "model":
            raise HubHTTPError(400, "this fake Hub only hosts models")
        namespace = data.get("organization") or account.user
        repo_id = f"{namespace}/{data['name']}"
        if not account.can_write(namespace):
            raise HubHTTPError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        with self._lock:
            if repo_id in self.repos:
                # Like the Hub, the conflict names the existing repo (create_repo(exist_ok=True) reads its url).
                raise HubHTTPError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            self.add_repo(repo_id, private=data.get("visibility") == "private")
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()})

    def _model_info(self, account: Account, repo: str, rev: str = "main", **_: Any):
        with self._lock:
            r = self._repo(repo, account)
            branch = self._branch(r, rev)
            return _json(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": branch.head,
                    "private": r.private,
                    "siblings": [{"rfilename": p} for p in sorted(branch.files)],
                }
            )

    def _refs(self, account: Account, repo: str, **_: Any):
        with self._lock:
            r = self._repo(repo, account)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": b.head} for n, b in r.branches.items()]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _create_branch(self, account: Account, repo: str, rev: str, body: bytes, **_: Any):
        data = json.loads(body) if body else {}
        with self._lock:
            r = self._writable(repo, account)
            if rev in r.branches:
                raise HubHTTPError(409, "Reference already exists")
            start = self._branch(r, data.get("startingPoint") or "main")
            r.branches[rev] = Branch(dict(start.files), start.head)
        return _json({})

    def _tree(self, account: Account, repo: str, rev: str, query: dict[str, str], path: str = "", **_: Any):
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        with self._lock:
            branch = self._branch(self._repo(repo, account), rev)
            files = dict(branch.files)
        prefix = f"{path.strip('/')}/" if path else ""
        if path and path.strip("/") in files:
            raise HubHTTPError(400, f"{path} is a file, not a directory")
        entries: dict[str, dict[str, Any]] = {}
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": git_blob_oid(folder.encode()), "size": 0})
            if recursive or len(rest) == 1:
                blob = files[p]
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": git_blob_oid(lfs_pointer(blob.data) if blob.lfs else blob.data),
                    "size": len(blob.data),
                }
                if blob.lfs:
                    entry["lfs"] = {
                        "oid": blob.sha256,
                        "size": len(blob.data),
                        "pointerSize": len(lfs_pointer(blob.data)),
                    }
                entries[p] = entry
        if path and not entries:
            raise HubHTTPError(404, f"{path} does not exist on {rev}", code="EntryNotFound")
        return _json([{**e, "path": p} for p, e in entries.items()])

    def _validate_yaml(self, body: bytes, **_: Any):
        import yaml

        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---"):
            try:
                front = yaml.safe_load(content.split("---", 2)[1])
                if front is not None and not isinstance(front, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except (yaml.YAMLError, IndexError) as e:
                errors.append({"message": f"invalid YAML: {e}"})
        return _json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _preupload(self, account: Account, repo: str, rev: str, body: bytes, **_: Any):
        data = json.loads(body)
        with self._lock:
            branch = self._branch(self._writable(repo, account), rev)
            out = []
            for f in data["files"]:
                sample = base64.b64decode(f["sample"])
                existing = branch.files.get(f["path"])
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if self._wants_lfs(branch, f["path"], sample, f["size"]) else "regular",
                        "shouldIgnore": False,
                        "oid": existing.oid if existing else None,
                    }
                )
        return _json({"files": out, "commitOid": branch.head})

    def _lfs_batch(self, account: Account, repo: str, body: bytes, **_: Any):
        data = json.loads(body)
        if data.get("operation") != "upload":
            raise HubHTTPError(400, "this fake Hub only accepts LFS uploads")
        if "basic" not in data.get("transfers", ["basic"]):
            raise HubHTTPError(400, "only the basic transfer is supported")
        objects = []
        with self._lock:
            self._writable(repo, account)
            for obj in data["objects"]:
                oid, size = obj["oid"], obj["size"]
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self.lfs:
                    ticket = secrets.token_hex(16)
                    self._tickets[ticket] = (oid, size, repo)
                    entry["actions"] = {
                        "upload": {"href": f"{self.url}/lfs-upload/{oid}?ticket={ticket}", "expires_in": 900},
                        "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                    }
                objects.append(entry)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, lfs=True)

    def _lfs_put(self, oid: str, body: bytes, query: dict[str, str], **_: Any):
        with self._lock:
            ticket = self._tickets.get(query.get("ticket", ""))
            if ticket is None or ticket[0] != oid:
                raise HubHTTPError(403, "invalid or expired upload URL")
            _, size, repo = ticket
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise HubHTTPError(400, f"uploaded content does not match oid {oid} / size {size}")
            del self._tickets[query["ticket"]]
            self.lfs[oid] = body
            self.lfs_uploads.append({"oid": oid, "size": size, "repo": repo})
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def _lfs_verify(self, account: Account, repo: str, body: bytes, **_: Any):
        data = json.loads(body)
        with self._lock:
            self._writable(repo, account)
            stored = self.lfs.get(data["oid"])
        if stored is None or len(stored) != data["size"]:
            raise HubHTTPError(404, f"LFS object {data['oid']} not found")
        return _json({"success": True})

    def _commit(
        self, account: Account, repo: str, rev: str, body: bytes, headers: Any, query: dict[str, str], **_: Any
    ):
        if "ndjson" not in (headers.get("Content-Type") or ""):
            raise HubHTTPError(400, "expected application/x-ndjson")
        if query.get("create_pr"):
            raise HubHTTPError(400, "this fake Hub does not do pull requests")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first line must be the commit header")
        header = lines[0]["value"]
        with self._lock:
            r = self._writable(repo, account)
            branch = self._branch(r, rev)
            if header.get("parentCommit") and header["parentCommit"] != branch.head:
                raise HubHTTPError(412, "parent commit is not the head of the branch")
            files = dict(branch.files)
            added: dict[str, str] = {}
            deleted: list[str] = []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubHTTPError(400, "regular files must be base64-encoded")
                    data = base64.b64decode(value["content"])
                    if b"\0" in data[:8000] or len(data) >= LFS_SIZE:
                        raise HubHTTPError(400, f"{value['path']} is binary or large: it must be uploaded with LFS")
                    files[value["path"]] = Blob(data, lfs=False)
                    added[value["path"]] = "regular"
                elif key == "lfsFile":
                    data = self.lfs.get(value["oid"])
                    if data is None or ("size" in value and len(data) != value["size"]):
                        raise HubHTTPError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = Blob(data, lfs=True)
                    added[value["path"]] = "lfs"
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubHTTPError(404, "A file with this name doesn't exist", code="EntryNotFound")
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    for p in gone:
                        del files[p]
                    deleted += gone
                else:
                    raise HubHTTPError(400, f"unknown commit operation {key!r}")
            oid = _new_oid()
            branch.files, branch.head = files, oid
            self.commits.append(
                {
                    "repo": repo,
                    "branch": rev,
                    "oid": oid,
                    "summary": header.get("summary"),
                    "files": added,
                    "deleted": deleted,
                }
            )
        return _json(
            {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}", "hookOutput": ""}
        )

    def _resolve(self, account: Account, repo: str, rev: str, path: str, **_: Any):
        with self._lock:
            branch = self._branch(self._repo(repo, account), rev)
            blob = branch.files.get(path)
            head = branch.head
        if blob is None:
            raise HubHTTPError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": head})
        etag = blob.sha256 if blob.lfs else git_blob_oid(blob.data)
        return (
            200,
            {"X-Repo-Commit": head, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
            blob.data,
        )


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.0"  # one request per connection: stopping the server really closes the door

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._body() if self.command in ("POST", "PUT") else b""
        status, headers, payload = self.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Type" not in headers:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


def _json(obj: Any, *, status: int = 200, lfs: bool = False) -> tuple[int, dict[str, str], bytes]:
    content_type = "application/vnd.git-lfs+json" if lfs else "application/json"
    return status, {"Content-Type": content_type}, json.dumps(obj).encode()


def _new_oid() -> str:
    return secrets.token_hex(20)


# ---------------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at the fake Hub
# ---------------------------------------------------------------------------------------------------------


def use_hub(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: Path, token: str | None) -> None:
    """Set the environment as a user would (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_OFFLINE=0``).

    ``huggingface_hub.constants`` reads these variables once, at import time (conftest imports transformers,
    hence huggingface_hub, before any fixture runs), so the constants derived from them are set to what the
    import would have computed: the endpoint, the offline switch, the paths under ``HF_HOME`` and the Xet
    switch (see the module docstring). Nothing else in huggingface_hub is touched.
    """
    from huggingface_hub import constants

    hf_home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    home = str(hf_home)
    derived = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": home,
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
    }
    for name, value in derived.items():
        if hasattr(constants, name) or name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE"):
            monkeypatch.setattr(constants, name, value)
    if hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset({*constants.HF_URL_HOSTS, "127.0.0.1"}))


@contextlib.contextmanager
def running_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running :class:`FakeHub`, with ``HF_ENDPOINT`` pointing at it and ``HF_TOKEN`` set to alice's write token.

    Use it in a fixture: ``with running_hub(tmp_path, monkeypatch) as hub: yield hub``.
    """
    from huggingface_hub import close_session

    hub = FakeHub()
    hub.start()
    use_hub(monkeypatch, hub.url, tmp_path / "hf-home", WRITE_TOKEN)
    close_session()  # a fresh HTTP client: no pooled connection from another test's server
    try:
        yield hub
    finally:
        hub.stop()
        close_session()
    assert not hub.errors, hub.errors
