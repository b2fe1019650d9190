"""A local stand-in for the Hugging Face Hub HTTP API: enough of it for ``create_repo`` / ``upload_folder`` of
model repos, and for ``datasets.load_dataset(<repo>, revision=..., streaming=True)`` of dataset repos.

It speaks the endpoints huggingface_hub (``HfApi``, ``hf_hub_download``, ``HfFileSystem``) uses for those calls,
found by running the real clients against it. Uploads are stored as they arrive, so a test can check that the
files really reached the "Hub". Upload (model repos):

* ``POST /api/repos/create``: create a model repo (records ``private``/``visibility``);
* ``POST /api/models/{repo}/preupload/{revision}``: answers ``lfs`` for ``*.safetensors`` / ``*.bin`` and
  ``regular`` for everything else (as the Hub does for binary weight files);
* ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /lfs-upload/{oid}``: the Git-LFS "basic" transfer
  (the client must be told not to use Xet: ``constants.HF_HUB_DISABLE_XET``);
* ``POST /api/validate-yaml``: the model-card metadata check the client runs before uploading a
  ``README.md``; answers 400 unless the front matter parses as a YAML mapping with a ``license``;
* ``POST /api/models/{repo}/commit/{revision}``: NDJSON commit; regular files arrive base64-encoded, LFS
  files by oid, which must have been uploaded with the right SHA-256 and size.

Download and streaming (dataset repos added with :meth:`LocalHub.add_dataset`; ``{revision}`` is a branch or
ref name URL-encoded as the Hub writes it, e.g. ``refs%2Fconvert%2Fparquet``, or the commit sha the client pins
after its first call):

* ``GET /api/datasets/{repo}/revision/{revision}``: repo info (``sha`` of the revision, ``siblings``);
* ``GET /api/datasets/{repo}/tree/{revision}[/{folder}]`` (``?recursive=``; no ``expand`` details): the folder
  listing, files with size, blob id and LFS sha-256, sub-folders as ``directory`` entries; one page;
* ``HEAD`` / ``GET /datasets/{repo}/resolve/{revision}/{path}``: file metadata (``X-Repo-Commit``, ``ETag``,
  ``Content-Length``) and content, with HTTP ``Range`` requests answered ``206 Partial Content``.

A missing repo, revision or file is answered as the Hub does: 404 with ``X-Error-Code`` ``RepoNotFound``,
``RevisionNotFound`` or ``EntryNotFound``, an ``X-Error-Message`` and a JSON ``{"error": ...}``. Every request is
recorded in ``requests`` as ``(method, path, Range header)``. Anything else is answered 404 and recorded in
``unknown_requests`` (except ``GET /api/agent-harnesses``, an optional registry the client may fetch once a
day, answered 404 without being recorded). Not served: the dataset viewer, which ``datasets`` asks for a
repo's exported infos at ``datasets-server.<endpoint host>`` when loading ``main``; that name does not resolve
for ``127.0.0.1``, and ``datasets`` goes on without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class StandInRepo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


@dataclass
class StandInRevision:
    """One revision of a dataset repo: its commit sha and files (path in the repo -> content)."""

    sha: str
    files: dict[str, bytes]

    def entry(self, path: str) -> dict | None:
        """The tree-listing entry of a file or folder, as the Hub writes it (``None``: not in the revision)."""
        if path in self.files:
            data = self.files[path]
            entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": path}
            if path.endswith(".parquet"):  # stored with Git-LFS on the Hub
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return entry
        if path == "" or any(name.startswith(path + "/") for name in self.files):
            return {"type": "directory", "oid": hashlib.sha1(f"tree {self.sha} {path}".encode()).hexdigest(),
                    "size": 0, "path": path}
        return None

    def listing(self, folder: str, recursive: bool) -> list[dict]:
        """The entries under ``folder`` (``""``: the root): direct children, or everything with ``recursive``."""
        prefix = f"{folder}/" if folder else ""
        paths: set[str] = set()
        for name in self.files:
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            paths.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        return [self.entry(path) for path in sorted(paths)]


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LocalHub:
    """``with LocalHub() as hub:`` serves on ``hub.endpoint`` (127.0.0.1, a free port) until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, StandInRepo] = {}
        self.datasets: dict[str, dict[str, StandInRevision]] = {}  # repo -> revision name -> files
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self.validated_cards: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add_dataset(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Serve ``files`` (path in the repo -> content) as ``revision`` of the dataset repo ``repo_id``.

        Returns:
            the revision's commit sha.
        """
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for path in sorted(files):
            digest.update(path.encode() + files[path])
        with self._lock:
            self.datasets.setdefault(repo_id, {})[revision] = StandInRevision(digest.hexdigest(), dict(files))
        return digest.hexdigest()

    def _dataset_revision(self, repo_id: str, revision: str) -> StandInRevision | None:
        revisions = self.datasets.get(repo_id, {})
        if revision in revisions:
            return revisions[revision]
        return next((found for found in revisions.values() if found.sha == revision), None)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ request handling
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload=None) -> None:
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _not_found(self, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _record(self) -> None:
                with hub._lock:
                    hub.requests.append((self.command, self.path, self.headers.get("Range")))

            def _unknown(self) -> None:
                hub.unknown_requests.append((self.command, self.path))
                self._reply(404, {"error": f"stand-in Hub does not serve {self.command} {self.path}"})

            def do_GET(self):
                self._body()
                self._record()
                path = self.path.split("?", 1)[0]
                if path == "/api/agent-harnesses":
                    # optional user-agent registry the client fetches at most daily; not part of an upload
                    return self._reply(404, {"error": "not served by the stand-in"})
                if path.startswith("/api/datasets/"):
                    return self._dataset_api(path[len("/api/datasets/") :])
                if path.startswith("/datasets/") and "/resolve/" in path:
                    return self._resolve(path[len("/datasets/") :])
                self._unknown()

            def do_HEAD(self):
                self._record()
                path = self.path.split("?", 1)[0]
                if path.startswith("/datasets/") and "/resolve/" in path:
                    return self._resolve(path[len("/datasets/") :])
                self._unknown()

            # ---------------------------------------------------------- dataset repos (download side)
            def _find(self, repo_id: str, revision: str) -> StandInRevision | None:
                """The revision, or ``None`` after answering the Hub's 404 for a missing repo / revision."""
                if repo_id not in hub.datasets:
                    self._not_found("RepoNotFound", f"Repository {repo_id!r} not found")
                    return None
                found = hub._dataset_revision(repo_id, revision)
                if found is None:
                    self._not_found("RevisionNotFound", f"Invalid rev id: {revision}")
                return found

            def _dataset_api(self, rest: str) -> None:
                # {ns}/{name}/revision/{rev} or {ns}/{name}/tree/{rev}[/{folder}]
                parts = rest.split("/")
                repo_id, action, tail = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else ""), parts[3:]
                if action == "revision" and tail:
                    found = self._find(repo_id, unquote(tail[0]))
                    if found is not None:
                        self._reply(200, {"_id": found.sha[:24], "id": repo_id, "author": repo_id.split("/")[0],
                                          "sha": found.sha, "private": False, "gated": False, "disabled": False,
                                          "tags": [], "downloads": 0, "likes": 0,
                                          "lastModified": "2024-01-01T00:00:00.000Z",
                                          "siblings": [{"rfilename": name} for name in sorted(found.files)]})
                    return None
                if action == "tree" and tail:
                    found = self._find(repo_id, unquote(tail[0]))
                    if found is None:
                        return None
                    folder = unquote("/".join(tail[1:])).strip("/")
                    query = parse_qs(urlsplit(self.path).query)
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    if found.entry(folder) is None or (folder and found.entry(folder)["type"] != "directory"):
                        return self._not_found("EntryNotFound", f"{folder!r} does not exist at revision {found.sha}")
                    return self._reply(200, found.listing(folder, recursive))
                self._unknown()

            def _resolve(self, rest: str) -> None:
                repo_id, _, tail = rest.partition("/resolve/")
                revision, _, path = tail.partition("/")
                found = self._find(repo_id, unquote(revision))
                if found is None:
                    return None
                path = unquote(path)
                data = found.files.get(path)
                if data is None:
                    return self._not_found("EntryNotFound", f"{path} does not exist at revision {found.sha}")
                start, end = 0, len(data) - 1
                requested = self.headers.get("Range")
                match = re.fullmatch(r"bytes=(\d*)-(\d*)", requested or "")
                if requested and match is None:
                    return self._reply(416, {"error": f"unsupported Range {requested!r}"})
                if match:
                    first, last = match.groups()
                    if first:
                        start, end = int(first), min(int(last), end) if last else end
                    else:
                        start = max(len(data) - int(last), 0)
                    if start > end:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                lfs = found.entry(path).get("lfs")
                self.send_response(206 if match else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("X-Repo-Commit", found.sha)
                self.send_header("ETag", f'"{lfs["oid"] if lfs else _git_blob_id(data)}"')
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[start : end + 1])

            def do_PUT(self):
                body = self._body()
                self._record()
                if self.path.startswith("/lfs-upload/"):
                    oid = self.path.rsplit("/", 1)[1]
                    with hub._lock:
                        hub.lfs_objects[oid] = body
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._unknown()

            def do_POST(self):
                body = self._body()
                self._record()
                hub.authorizations.append(self.headers.get("Authorization"))
                path = self.path.split("?", 1)[0]
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if path.startswith("/api/models/") and "/preupload/" in path:
                    return self._preupload(json.loads(body))
                if path.endswith(".git/info/lfs/objects/batch"):
                    return self._lfs_batch(json.loads(body))
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo_id = path[len("/api/models/") :].split("/commit/", 1)[0]
                    return self._commit(repo_id, body)
                self._unknown()

            def _create(self, payload: dict) -> None:
                if payload.get("type", "model") not in (None, "model"):
                    return self._reply(400, {"error": "only model repos"})
                name = payload["name"]
                repo_id = f"{payload['organization']}/{name}" if payload.get("organization") else name
                private = bool(payload.get("private")) or payload.get("visibility") == "private"
                with hub._lock:
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                    hub.repos[repo_id] = StandInRepo(private=private)
                self._reply(200, {"url": f"{hub.endpoint}/{repo_id}"})

            def _validate_yaml(self, payload: dict) -> None:
                import yaml

                content = payload.get("content", "")
                hub.validated_cards.append(content)
                match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
                try:
                    metadata = yaml.safe_load(match.group(1) if match else content)
                except yaml.YAMLError as error:
                    return self._reply(400, {"error": f"invalid YAML: {error}"})
                if not isinstance(metadata, dict) or "license" not in metadata:
                    return self._reply(400, {"error": "metadata must be a mapping with a license"})
                self._reply(200, {"errors": [], "warnings": []})

            def _preupload(self, payload: dict) -> None:
                files = [
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if item["path"].endswith((".safetensors", ".bin")) else "regular",
                        "shouldIgnore": False,
                    }
                    for item in payload["files"]
                ]
                self._reply(200, {"files": files})

            def _lfs_batch(self, payload: dict) -> None:
                objects = [
                    {
                        "oid": item["oid"],
                        "size": item["size"],
                        "authenticated": True,
                        "actions": {"upload": {"href": f"{hub.endpoint}/lfs-upload/{item['oid']}"}},
                    }
                    for item in payload["objects"]
                ]
                self._reply(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo_id: str, body: bytes) -> None:
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": f"repo {repo_id} not found"})
                files: dict[str, bytes] = {}
                summary = ""
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    entry = json.loads(line)
                    value = entry["value"]
                    if entry["key"] == "header":
                        summary = value.get("summary", "")
                    elif entry["key"] == "file":
                        if value.get("encoding") != "base64":
                            return self._reply(400, {"error": f"unsupported encoding for {value['path']}"})
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif entry["key"] == "lfsFile":
                        data = hub.lfs_objects.get(value["oid"])
                        if data is None or hashlib.sha256(data).hexdigest() != value["oid"] or len(data) != value["size"]:
                            return self._reply(400, {"error": f"LFS object of {value['path']} missing or corrupt"})
                        files[value["path"]] = data
                    else:
                        return self._reply(400, {"error": f"unsupported commit operation {entry['key']}"})
                with hub._lock:
                    repo = hub.repos[repo_id]
                    repo.files.update(files)
                    repo.commits.append(summary)
                    oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
                self._reply(
                    200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )

        return Handler
