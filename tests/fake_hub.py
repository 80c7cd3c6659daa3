"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking what `huggingface_hub` uses.

- `GET /api/models/{repo}[/revision/{rev}]?blobs=True`: model info with LFS sha256s;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag`; LFS files answer 302 to a
  separate "CDN" server (another origin, as on the real Hub) with `X-Linked-Etag` (the sha256)
  and `X-Linked-Size`;
- the CDN serves bytes with `Range` support, and can drop a connection part-way through.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".model", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    lie_about_sha: set[str] = field(default_factory=set)

    def sha256(self, name: str) -> str:
        real = hashlib.sha256(self.files[name]).hexdigest()
        return ("0" * 64) if name in self.lie_about_sha else real


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    """filename -> bytes after which the CDN drops the connection (once)."""
    kill_after: dict[str, int] = field(default_factory=dict)
    """filename -> bytes after which every CDN response stops (simulates a dead network)."""
    bytes_served: dict[str, int] = field(default_factory=dict)
    throttle: dict[str, float] = field(default_factory=dict)
    """filename -> seconds the CDN waits after each MiB it sends (a slow network)."""
    endpoint: str = ""
    cdn: str = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes], **kw: Any) -> Repo:
        self.repos[repo_id] = Repo(files=files, **kw)
        return self.repos[repo_id]

    def add_dir(self, repo_id: str, directory: Path, **kw: Any) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        return self.add_repo(repo_id, files, **kw)

    def find_blob(self, sha_or_key: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if f"{repo.commit}-{name}" == sha_or_key:
                    return name, data
        return None


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.handle_request(head=True)

        def do_GET(self) -> None:
            self.handle_request(head=False)

        def handle_request(self, head: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            path = unquote(urlparse(self.path).path)
            if role == "cdn":
                return self.serve_cdn(path, head)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                return self.serve_info(m.group(1))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self.serve_resolve(m.group(1), m.group(2), m.group(3), head)
            self.reply(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})

        def reply(
            self, status: int, body: bytes, headers: dict[str, str], head: bool = False
        ) -> None:
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def serve_info(self, repo_id: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                body = json.dumps({"error": "Repository not found"}).encode()
                return self.reply(404, body, {"X-Error-Code": "RepoNotFound"})
            siblings = []
            for name, data in repo.files.items():
                entry: dict[str, Any] = {"rfilename": name, "size": len(data)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {
                        "sha256": repo.sha256(name),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                siblings.append(entry)
            info = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "siblings": siblings,
                "tags": [],
                "downloads": 0,
                "likes": 0,
            }
            self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def serve_resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or name not in repo.files:
                return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = repo.files[name]
            common = {"X-Repo-Commit": repo.commit}
            if name.endswith(LFS_SUFFIXES):
                sha = repo.sha256(name)
                headers = {
                    **common,
                    "Location": f"{hub.cdn}/cdn/{repo.commit}-{name}",
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{sha}"',
                }
                return self.reply(302, b"", headers, head)
            etag = hashlib.sha1(data).hexdigest()
            self.reply(200, data, {**common, "ETag": f'"{etag}"'}, head)

        def serve_cdn(self, path: str, head: bool) -> None:
            found = hub.find_blob(path.removeprefix("/cdn/"))
            if found is None:
                return self.reply(404, b"", {}, head)
            name, data = found
            start = 0
            status = 200
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                assert m, rng
                start = int(m.group(1))
                status = 206
            body = data[start:]
            headers = {"Accept-Ranges": "bytes", "Content-Length": str(len(body))}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            limit = len(body)
            if name in hub.drop_after:
                limit = max(0, hub.drop_after.pop(name) - start)
            if name in hub.kill_after:
                limit = max(0, hub.kill_after[name] - start)
            if name in hub.throttle:
                sent = 0
                try:
                    while sent < limit:
                        chunk = body[sent : min(limit, sent + (1 << 20))]
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                        hub.bytes_served[name] = hub.bytes_served.get(name, 0) + len(chunk)
                        time.sleep(hub.throttle[name])
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (a cancelled download)
                return
            self.wfile.write(body[:limit])
            hub.bytes_served[name] = hub.bytes_served.get(name, 0) + min(limit, len(body))
            if limit < len(body):
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


def start(hub: FakeHub) -> list[ThreadingHTTPServer]:
    servers = []
    for role in ("hub", "cdn"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, role))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    hub.endpoint = f"http://127.0.0.1:{servers[0].server_address[1]}"
    hub.cdn = f"http://127.0.0.1:{servers[1].server_address[1]}"
    return servers
