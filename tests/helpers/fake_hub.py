"""A Hugging Face Hub on 127.0.0.1 for the real huggingface_hub client (set HF_ENDPOINT to `url`).

It implements the routes `snapshot_download` and `HfApi.repo_info` use (huggingface_hub 2.x):
  GET  /api/{models,datasets}/ORG/NAME/revision/REV        repo info: sha, siblings
  GET  /api/{models,datasets}/ORG/NAME/tree/REV?recursive   the file listing
  HEAD/GET /[datasets/]ORG/NAME/resolve/REV/PATH            a file, with X-Repo-Commit and ETag
and answers errors the way the Hub does (X-Error-Code RepoNotFound / RevisionNotFound / GatedRepo),
so the client raises its own error classes. Every file GET is counted in `downloads`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: Dict[str, bytes]
    commit: str
    branches: Dict[str, str] = field(default_factory=dict)  # name -> commit
    token: Optional[str] = None  # gated: this bearer token is needed


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


class FakeHub:
    def __init__(self):
        self.repos: Dict[tuple, Repo] = {}
        self.downloads: Counter = Counter()  # (repo_id, path) -> file GETs
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, kind: str, repo_id: str, files: Dict[str, bytes], token: Optional[str] = None) -> str:
        """Publish `files` as the `main` branch of a `kind` ("model" | "dataset") repo; returns its commit."""
        commit = hashlib.sha1(json.dumps(sorted((k, _oid(v)) for k, v in files.items())).encode()).hexdigest()
        self.repos[(kind, repo_id)] = Repo(files=files, commit=commit, branches={"main": commit}, token=token)
        return commit

    def add_dir(self, kind: str, repo_id: str, path: Path, token: Optional[str] = None) -> str:
        files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        return self.add(kind, repo_id, files, token)

    def close(self):
        self._server.shutdown()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", headers: Optional[dict] = None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, code: int, error_code: str, message: str):
                self._send(code, json.dumps({"error": message}).encode(), {"X-Error-Code": error_code, "X-Error-Message": message, "Content-Type": "application/json"})

            def _repo(self, kind: str, repo_id: str, rev: str):
                repo = hub.repos.get((kind, repo_id))
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None, None
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it and be authenticated to access it.")
                    return None, None
                commit = repo.branches.get(rev, rev if rev == repo.commit else None)
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return None, None
                return repo, commit

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
                if parts[0] == "api" and len(parts) < 6:
                    print("fake hub: unhandled", self.command, self.path, flush=True)
                    return self._error(404, "EntryNotFound", "unhandled route")
                if parts[0] == "api":  # api/{models,datasets}/ORG/NAME/{revision,tree}/REV[/path]
                    kind = parts[1][:-1]
                    repo_id, what, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    repo, commit = self._repo(kind, repo_id, rev)
                    if repo is None:
                        return
                    if what == "revision":
                        info = {"id": repo_id, "sha": commit, "private": False, "gated": "auto" if repo.token else False,
                                "siblings": [{"rfilename": p} for p in sorted(repo.files)], "tags": [], "downloads": 0, "likes": 0}
                        return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                    tree = [{"type": "file", "path": p, "size": len(d), "oid": _oid(d)} for p, d in sorted(repo.files.items())]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                kind = "dataset" if parts[0] == "datasets" else "model"
                parts = parts[1:] if kind == "dataset" else parts
                repo_id, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                repo, commit = self._repo(kind, repo_id, rev)
                if repo is None:
                    return
                if path not in repo.files:
                    return self._error(404, "EntryNotFound", f"{path} does not exist")
                data = repo.files[path]
                if self.command == "GET":
                    hub.downloads[(repo_id, path)] += 1
                self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{_oid(data)}"', "Content-Type": "application/octet-stream"})

        return Handler


def point_at(monkeypatch, url: str, cache) -> None:
    """huggingface_hub in this process: talk to `url`, cache in `cache` (it read HF_ENDPOINT and
    HF_HUB_CACHE at import, so the environment alone would not reach it)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("SFT_HUB_PINS", raising=False)
    import launcher.hub

    monkeypatch.setattr(launcher.hub, "_resolved", {})
