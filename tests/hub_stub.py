"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests (no network).

`HubStub` serves, on 127.0.0.1 only and a random port, just enough of the Hub's API for
huggingface_hub 2.x (httpx2 client) and transformers 5 to push and pull model repositories:

- ``POST /api/repos/create``                                   create_repo (409 when it exists)
- ``GET  /api/whoami-v2``                                      whoami (namespace of bare repo names)
- ``POST /api/validate-yaml``                                  README.md metadata check before a commit
- ``GET  /api/agent-harnesses``                                the client's user-agent registry (empty)
- ``POST /api/{type}s/{repo}/preupload/{revision}``            upload modes: always "regular" (no LFS, no Xet)
- ``POST /api/{type}s/{repo}/commit/{revision}``               the NDJSON commit (header, base64 files, deletions)
- ``GET  /api/{type}s/{repo}[/revision/{revision}]``           model_info / repo_info (sha, siblings)
- ``GET  /api/{type}s/{repo}/tree/{revision}[/{path}]``        list_repo_tree / list_repo_files (recursive or not)
- ``POST /api/{type}s/{repo}/paths-info/{revision}``           get_paths_info
- ``GET  /api/{type}s/{repo}/refs``                            list_repo_refs
- ``HEAD|GET /[{type}s/]{repo}/resolve/{revision}/{path}``     file metadata + download (X-Repo-Commit, ETag,
                                                               Content-Length; X-Error-Code on 404)

Repositories live in a temporary folder: every blob is stored once under its git SHA-1, every commit
is a JSON manifest ``{path: blob id}``. Anything else answers 404 and is recorded in
``HubStub.unhandled`` so a test can see what a client asked for.

Usage::

    with HubStub() as hub, hub.patched():      # in-process clients now talk to the stub
        ...                                    # subprocesses: env=hub.environment(tmp_path)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

LOOPBACK = "127.0.0.1"
STUB_USER = "stub-user"
REPO_TYPES = ("model", "dataset", "space")


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}
        self.extra = extra or {}  # more JSON fields of the error body


class StubRepository:
    """One repository: commits (oldest first), each a manifest {path: blob id}, and a blob store on disk."""

    def __init__(self, repo_id: str, repo_type: str, private: bool, root: Path):
        self.repo_id, self.repo_type, self.private = repo_id, repo_type, private
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.commits: list[dict] = []  # {"oid", "message", "description", "files": {path: blob}, "changed": [...]}
        self._commit("initial commit", {}, [])  # the Hub creates repos with a .gitattributes commit; keep it empty

    def _commit(self, message, files, changed, description=""):
        seed = f"{self.repo_id}\n{len(self.commits)}\n{message}\n{sorted(files.items())}\n{time.time_ns()}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        self.commits.append(dict(oid=oid, message=message, description=description, files=dict(files),
                                 changed=list(changed)))
        return oid

    def resolve(self, revision: str) -> dict:
        revision = urllib.parse.unquote(revision)
        if revision in ("main", "refs/heads/main"):
            return self.commits[-1]
        for commit in self.commits:
            if len(revision) >= 7 and commit["oid"].startswith(revision):
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def read(self, blob: str) -> bytes:
        return (self.blobs / blob).read_bytes()

    def size(self, blob: str) -> int:
        return (self.blobs / blob).stat().st_size

    def apply(self, header: dict, operations: list[dict]) -> str:
        parent = header.get("parentCommit")
        if parent and not self.commits[-1]["oid"].startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(self.commits[-1]["files"])
        changed = []
        for operation in operations:
            key, value = operation["key"], operation["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                content = base64.b64decode(value["content"])
                blob = git_blob_id(content)
                (self.blobs / blob).write_bytes(content)
                files[path] = blob
            elif key == "lfsFile":
                raise HubError(400, f"{path}: the stub never asks for LFS uploads (preupload says 'regular')")
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [name for name in files if name.startswith(prefix)]:
                    del files[name]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
            changed.append(path)
        return self._commit(header.get("summary", ""), files, changed, header.get("description", ""))


def _tree_entries(files: dict, repo: StubRepository, folder: str, recursive: bool) -> list[dict]:
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    entries, folders = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if depth > 1 and not recursive:
                break
            folders.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "path": path, "oid": files[path], "size": repo.size(files[path])})
    for name in sorted(folders):
        entries.append({"type": "directory", "path": name, "oid": hashlib.sha1(name.encode()).hexdigest()})
    return entries


class HubStub:
    """The stub server. Start with `start()` (or use as a context manager); `url` is its endpoint."""

    def __init__(self, root: str | os.PathLike | None = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="hub-stub-") if root is None else root)
        self.repos: dict[tuple[str, str], StubRepository] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []  # requests the stub answered with a bare 404
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubStub is not started")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> "HubStub":
        stub = self

        class Handler(_StubRequestHandler):
            hub = stub

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- helpers for tests ----------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> StubRepository:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Contents of every file of a repository at `revision`."""
        repo = self.repo(repo_id, repo_type)
        return {path: repo.read(blob) for path, blob in repo.resolve(revision)["files"].items()}

    def environment(self, home: str | os.PathLike, base: dict | None = None) -> dict[str, str]:
        """Environment for a subprocess that must talk to the stub (its own HF_HOME, no Xet, no telemetry)."""
        env = dict(os.environ if base is None else base)
        env.update(HF_ENDPOINT=self.url, HF_TOKEN="dummy", HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_HUB_CACHE", None)
        return env

    @contextlib.contextmanager
    def patched(self, home: str | os.PathLike | None = None):
        """Point the in-process huggingface_hub and transformers at the stub, and restore them after.

        With `home`, downloads are cached under it instead of the user's cache (transformers' dynamic
        module folder, fixed at import, stays where it is).

        huggingface_hub reads HF_ENDPOINT once at import into `constants.ENDPOINT` and
        `constants.HUGGINGFACE_CO_URL_TEMPLATE`; `HfApi` instances copy the endpoint when built (the
        module-level `huggingface_hub.hf_api.api` behind `upload_file`, `create_repo`, ... and
        transformers' shared `transformers.utils.hub._hf_api`). Every copy is patched here.
        """
        from huggingface_hub import constants

        saved_env = {key: os.environ.get(key) for key in ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE")}
        saved_constants = {name: getattr(constants, name) for name in (
            "ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_DISABLE_XET", "HF_HUB_OFFLINE", "HF_HOME",
            "HF_HUB_CACHE", "HF_ASSETS_CACHE", "AGENT_HARNESSES_PATH")}
        old_endpoint = constants.ENDPOINT
        patched_apis = []
        os.environ.update(HF_ENDPOINT=self.url, HF_TOKEN="dummy")
        if home is not None:  # downloads go to `home`, not the user's cache (read at call time)
            os.environ["HF_HOME"] = str(home)
            os.environ["HF_HUB_CACHE"] = str(Path(home) / "hub")
            constants.HF_HOME = str(home)
            constants.HF_HUB_CACHE = str(Path(home) / "hub")
            constants.HF_ASSETS_CACHE = str(Path(home) / "assets")
            constants.AGENT_HARNESSES_PATH = str(Path(home) / ".agent_harnesses.json")
        constants.ENDPOINT = self.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_DISABLE_XET = True  # upload_folder takes the plain preupload + commit path
        constants.HF_HUB_OFFLINE = False
        for api in _loaded_hf_apis():
            if api.endpoint == old_endpoint:
                patched_apis.append(api)
                api.endpoint = self.url
        transformers_hub = sys.modules.get("transformers.utils.hub")
        saved_shared_api = getattr(transformers_hub, "_hf_api", None) if transformers_hub else None
        if transformers_hub is not None:
            transformers_hub._hf_api = None  # rebuilt on first use, from the patched constants
        try:
            yield self
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            for name, value in saved_constants.items():
                setattr(constants, name, value)
            for api in patched_apis:
                api.endpoint = old_endpoint
            if transformers_hub is not None:
                transformers_hub._hf_api = saved_shared_api

    # ---- request handling (called from server threads) ------------------------------------------
    def _get_repo(self, repo_type: str, repo_id: str) -> StubRepository:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _repo_url(self, repo: StubRepository) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"

    def create_repo(self, payload: dict) -> dict:
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise HubError(400, "Missing repository name")
        repo_id = f"{organization or STUB_USER}/{name}"
        repo_type = payload.get("type") or "model"
        with self._lock:
            if (repo_type, repo_id) in self.repos:  # the Hub's 409 body still carries the repo URL
                existing = self.repos[(repo_type, repo_id)]
                raise HubError(409, "You already created this model repo", extra={"url": self._repo_url(existing)})
            folder = self.root / f"{repo_type}s" / repo_id.replace("/", "--")
            repo = StubRepository(repo_id, repo_type, payload.get("visibility") == "private", folder)
            self.repos[(repo_type, repo_id)] = repo
        return {"url": self._repo_url(repo), "name": repo_id, "id": repo_id}

    def repo_info(self, repo: StubRepository, revision: str) -> dict:
        commit = repo.resolve(revision)
        card = {}
        if "README.md" in commit["files"]:
            text = repo.read(commit["files"]["README.md"]).decode("utf-8")
            if text.startswith("---"):
                with contextlib.suppress(yaml.YAMLError, IndexError):
                    card = yaml.safe_load(text.split("---", 2)[1]) or {}
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit["oid"],
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []),
            "pipeline_tag": card.get("pipeline_tag"),
            "library_name": card.get("library_name"),
            "cardData": card or None,
            "siblings": [{"rfilename": path} for path in sorted(commit["files"])],
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
        }


def _loaded_hf_apis():
    """HfApi instances held at module level by already-imported modules (e.g. `huggingface_hub.hf_api.api`)."""
    from huggingface_hub import HfApi

    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("huggingface_hub", "transformers", "datasets", "evaluate")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, HfApi):
                found[id(value)] = value
    return list(found.values())


class _StubRequestHandler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # ---- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None,
              head_only: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers=None):
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _dispatch(self, method: str):
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query)
        self.hub.requests.append((method, parsed.path))
        try:
            body = self._body() if method == "POST" else b""
            handled = self._route(method, parsed.path, query, body)
            if not handled:
                self.hub.unhandled.append((method, self.path))
                self._json(404, {"error": f"stub: no route for {method} {parsed.path}"})
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self._send(error.status, json.dumps({"error": error.message, **error.extra}).encode(), headers=headers,
                       head_only=method == "HEAD")
        except Exception as error:  # a bug in the stub: report it to the client rather than hang
            self._json(500, {"error": f"stub failure: {type(error).__name__}: {error}"})

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ---- routes ---------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> bool:
        hub = self.hub
        parts = [urllib.parse.unquote(part) for part in path.strip("/").split("/")]
        if method == "POST" and path == "/api/repos/create":
            self._json(200, hub.create_repo(json.loads(body or b"{}")))
            return True
        if method == "GET" and path == "/api/whoami-v2":
            self._json(200, {"type": "user", "name": STUB_USER, "fullname": "Hub stub", "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            return True
        if method == "GET" and path == "/api/agent-harnesses":  # user-agent registry, fetched once a day
            self._json(200, {"standardEnvVars": [], "harnesses": {}})
            return True
        if method == "POST" and path == "/api/validate-yaml":
            self._validate_yaml(json.loads(body or b"{}"))
            return True
        if len(parts) >= 4 and parts[0] == "api" and parts[1].rstrip("s") in REPO_TYPES:
            return self._repo_api(method, parts[1].rstrip("s"), parts[2:], query, body)
        if "resolve" in parts and method in ("GET", "HEAD"):
            return self._resolve(method, parts)
        return False

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
            except (yaml.YAMLError, IndexError) as error:
                self._json(400, {"errors": [{"message": f"Invalid YAML metadata: {error}"}], "warnings": []})
                return
            if metadata is not None and not isinstance(metadata, dict):
                self._json(400, {"errors": [{"message": "Metadata must be a YAML mapping"}], "warnings": []})
                return
        self._json(200, {"errors": [], "warnings": []})

    def _repo_api(self, method, repo_type, parts, query, body) -> bool:
        # parts: namespace, name, [action, revision, path...]
        repo_id = "/".join(parts[:2])
        action = parts[2] if len(parts) > 2 else None
        rest = parts[3:]
        repo = self.hub._get_repo(repo_type, repo_id)
        if method == "GET" and action is None:
            self._json(200, self.hub.repo_info(repo, "main"))
        elif method == "GET" and action == "revision" and rest:
            self._json(200, self.hub.repo_info(repo, "/".join(rest)))
        elif method == "POST" and action == "preupload" and rest:
            files = repo.resolve("/".join(rest))["files"]
            request = json.loads(body or b"{}")
            self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
                for f in request.get("files", [])
            ], "commitOid": repo.commits[-1]["oid"]})
        elif method == "POST" and action == "commit" and rest:
            revision = urllib.parse.unquote("/".join(rest))
            if revision not in ("main", "refs/heads/main"):
                raise HubError(400, f"The stub only commits to main, not {revision!r}")
            lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "The commit payload must start with a header line")
            with self.hub._lock:
                oid = repo.apply(lines[0]["value"], lines[1:])
            self._json(200, {"commitUrl": f"{self.hub._repo_url(repo)}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None, "success": True})
        elif method == "GET" and action == "tree" and rest:
            files = repo.resolve(rest[0])["files"]
            recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
            folder = "/".join(rest[1:])
            entries = _tree_entries(files, repo, folder, recursive)
            if folder and not entries:
                raise HubError(404, f"{folder} does not exist", "EntryNotFound")
            self._json(200, entries)
        elif method == "POST" and action == "paths-info" and rest:
            files = repo.resolve("/".join(rest))["files"]
            form = urllib.parse.parse_qs(body.decode("utf-8"))
            entries = []
            for path in form.get("paths", []):
                if path in files:
                    entries.append({"type": "file", "path": path, "oid": files[path], "size": repo.size(files[path])})
                elif any(name.startswith(path.rstrip("/") + "/") for name in files):
                    entries.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
            self._json(200, entries)
        elif method == "GET" and action == "refs":
            head = repo.commits[-1]["oid"]
            self._json(200, {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}],
                             "tags": [], "converts": []})
        else:
            return False
        return True

    def _resolve(self, method, parts) -> bool:
        index = parts.index("resolve")
        head, tail = parts[:index], parts[index + 1:]
        repo_type = "model"
        if head and head[0].rstrip("s") in ("dataset", "space") and len(head) == 3:
            repo_type, head = head[0].rstrip("s"), head[1:]
        if len(head) != 2 or len(tail) < 2:
            return False
        repo = self.hub._get_repo(repo_type, "/".join(head))
        commit = repo.resolve(tail[0])
        filename = "/".join(tail[1:])
        headers = {"X-Repo-Commit": commit["oid"]}
        blob = commit["files"].get(filename)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers=headers)
        content = repo.read(blob)
        headers.update({"ETag": f'"{blob}"', "Accept-Ranges": "bytes"})
        self._send(200, content, content_type="application/octet-stream", headers=headers,
                   head_only=method == "HEAD")
        return True
