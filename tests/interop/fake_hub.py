"""An in-memory Hugging Face Hub behind huggingface_hub's HTTP client (the network edge).

`FakeHub.install()` makes huggingface_hub send every request to `FakeHub.handle` through
an httpx MockTransport; the real huggingface_hub code builds the requests, parses the
answers and writes its cache. The fake serves the Hub's REST endpoints that creating a
repository, committing files (as "regular" uploads, inlined in the commit), reading a
revision, listing a tree and downloading a file use, with the Hub's error codes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

ENDPOINT = "https://huggingface.co"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    # commit sha -> {path: bytes}; branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """Repositories in memory, and a log of (method, path) of every request served."""

    def __init__(self, token: str = "hf_fake_write_token") -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.token = token
        self.offline = False
        self.validated: list[dict] = []  # README metadata blocks the Hub checked

    # -- what tests look at -----------------------------------------------------------

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        r = self.repos[repo]
        return r.commits[r.branches.get(revision, revision)]

    def install(self, monkeypatch, cache_dir) -> None:
        """Route huggingface_hub's HTTP through this fake and its cache to `cache_dir`."""
        import huggingface_hub
        from huggingface_hub import constants

        http = _httpx()
        self.cache_dir = Path(cache_dir)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", ENDPOINT)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        huggingface_hub.set_client_factory(
            lambda: http.Client(transport=http.MockTransport(self.handle))
        )

    @staticmethod
    def uninstall() -> None:
        import huggingface_hub
        from huggingface_hub.utils._http import default_client_factory

        huggingface_hub.set_client_factory(default_client_factory)

    # -- the server -------------------------------------------------------------------

    def handle(self, request):
        http = _httpx()
        path = unquote(request.url.path)
        self.requests.append((request.method, path))
        if self.offline:
            raise http.ConnectError("network is unreachable", request=request)
        routes = [
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._commit),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", self._branch),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", self._info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?P<path>/.*)?",
             self._tree),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]  # fmt: skip
        for method, pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if request.method == method and match:
                return answer(request, **match.groupdict())
        return http.Response(404, json={"error": f"no route {request.method} {path}"})

    def _authorised(self, request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _error(self, status: int, code: str, message: str):
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        return _httpx().Response(status, json={"error": message}, headers=headers)

    def _repo(self, request, repo: str) -> Repo | None:
        r = self.repos.get(repo)
        if r is None or (r.private and not self._authorised(request)):
            return None
        return r

    def _commit_of(self, r: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in r.branches:
            return r.branches[rev]
        return rev if rev in r.commits else None

    def _create(self, request, **_):
        if not self._authorised(request):
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        body = json.loads(request.content)
        repo = f"{body.get('organization')}/{body['name']}"
        if repo in self.repos:  # the Hub's 409 names the existing repository's URL
            message = "You already created this model repo"
            return _httpx().Response(
                409, json={"error": message, "url": f"{ENDPOINT}/{repo}"},
                headers={"X-Error-Code": "Conflict", "X-Error-Message": message},
            )  # fmt: skip
        # Older huggingface_hub versions send "private", newer ones "visibility".
        private = bool(body.get("private")) or body.get("visibility") == "private"
        self.repos[repo] = Repo(private=private)
        return _httpx().Response(200, json={"url": f"{ENDPOINT}/{repo}", "name": repo})

    def _validate_yaml(self, request, **_):
        """Check a README's metadata block parses as a YAML mapping (the Hub checks more)."""
        import yaml

        content = json.loads(request.content)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as err:
            meta = str(err)
        if not isinstance(meta, dict):
            return _httpx().Response(400, json={"errors": [{"message": f"bad metadata: {meta}"}]})
        self.validated.append(meta)
        return _httpx().Response(200, json={"warnings": []})

    def _preupload(self, request, repo: str, rev: str):
        if self._repo(request, repo) is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        files = json.loads(request.content)["files"]
        return _httpx().Response(
            200,
            json={
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]
            },
        )

    def _branch(self, request, repo: str, branch: str):
        r = self._repo(request, repo)
        if r is None or not self._authorised(request):
            return self._error(404, "RepoNotFound", "Repository not found")
        if branch in r.branches:
            return self._error(409, "Conflict", "Reference already exists")
        r.branches[branch] = r.branches.get("main", "")  # "": an empty branch
        return _httpx().Response(200, json={})

    def _commit(self, request, repo: str, rev: str):
        r = self._repo(request, repo)
        if r is None or not self._authorised(request):
            return self._error(404, "RepoNotFound", "Repository not found")
        branch = unquote(rev)
        if branch not in r.branches and branch != "main":
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        parent = r.branches.get(branch)
        tree = dict(r.commits[parent]) if parent else {}
        summary = ""
        for line in request.content.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64"
                tree[value["path"]] = base64.b64decode(value["content"])
            else:
                raise AssertionError(f"unexpected commit line {item['key']}")
        sha = hashlib.sha1(f"{parent}{sorted(tree.items())}{summary}".encode()).hexdigest()
        r.commits[sha], r.branches[branch], r.messages[sha] = tree, sha, summary
        return _httpx().Response(
            200,
            json={"commitUrl": f"{ENDPOINT}/{repo}/commit/{sha}", "commitOid": sha,
                  "success": True},
        )  # fmt: skip

    def _info(self, request, repo: str, rev: str):
        r = self._repo(request, repo)
        if r is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        sha = self._commit_of(r, rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return _httpx().Response(
            200,
            json={
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": r.private,
                "siblings": [{"rfilename": p} for p in sorted(r.commits[sha])],
            },
        )

    def _tree(self, request, repo: str, rev: str, path: str | None = None):
        r = self._repo(request, repo)
        if r is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        sha = self._commit_of(r, rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        prefix = (path or "").strip("/")
        entries, folders = [], set()
        for name, data in sorted(r.commits[sha].items()):
            if prefix and not name.startswith(prefix + "/"):
                continue
            parts = name.split("/")
            for i in range(1, len(parts)):
                folders.add("/".join(parts[:i]))
            entries.append(
                {"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
            )
        entries += [{"type": "directory", "path": f, "size": 0, "oid": "0" * 40} for f in folders]
        return _httpx().Response(200, json=entries)

    def _resolve(self, request, repo: str, rev: str, file: str):
        r = self._repo(request, repo)
        if r is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        sha = self._commit_of(r, rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        data = r.commits[sha].get(file)
        if data is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist")
        headers = {
            "ETag": f'"{_git_blob_id(data)}"',
            "X-Repo-Commit": sha,
            "Content-Length": str(len(data)),
        }
        body = b"" if request.method == "HEAD" else data
        return _httpx().Response(200, headers=headers, content=body)


def _httpx():
    """The httpx module huggingface_hub uses (httpx2 in its newer releases)."""
    from huggingface_hub.utils import _http

    for name in ("httpx2", "httpx"):
        module = getattr(_http, name, None)
        if module is not None:
            return module
    raise RuntimeError("huggingface_hub uses no httpx client")
