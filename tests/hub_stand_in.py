"""A local stand-in for the Hugging Face Hub HTTP API: enough of it for ``create_repo`` and ``upload_folder``.

It speaks the endpoints huggingface_hub uses for those calls and stores what arrives, so a test can check
that the files really reached the "Hub":

* ``POST /api/repos/create``: create a model repo (records ``private``/``visibility``);
* ``POST /api/models/{repo}/preupload/{revision}``: answers ``lfs`` for ``*.safetensors`` / ``*.bin`` and
  ``regular`` for everything else (as the Hub does for binary weight files);
* ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /lfs-upload/{oid}``: the Git-LFS "basic" transfer
  (the client must be told not to use Xet: ``constants.HF_HUB_DISABLE_XET``);
* ``POST /api/validate-yaml``: the model-card metadata check the client runs before uploading a
  ``README.md``; answers 400 unless the front matter parses as a YAML mapping with a ``license``;
* ``POST /api/models/{repo}/commit/{revision}``: NDJSON commit; regular files arrive base64-encoded, LFS
  files by oid, which must have been uploaded with the right SHA-256 and size.

Anything else is answered 404 and recorded in ``unknown_requests`` (except ``GET /api/agent-harnesses``, an
optional registry the client may fetch once a day, answered 404 without being recorded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class StandInRepo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class LocalHub:
    """``with LocalHub() as hub:`` serves on ``hub.endpoint`` (127.0.0.1, a free port) until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, StandInRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.unknown_requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self.validated_cards: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

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

            def _unknown(self) -> None:
                hub.unknown_requests.append((self.command, self.path))
                self._reply(404, {"error": f"stand-in Hub does not serve {self.command} {self.path}"})

            def do_GET(self):
                self._body()
                if self.path.split("?", 1)[0] == "/api/agent-harnesses":
                    # optional user-agent registry the client fetches at most daily; not part of an upload
                    return self._reply(404, {"error": "not served by the stand-in"})
                self._unknown()

            def do_PUT(self):
                body = self._body()
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
