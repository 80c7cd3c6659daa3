"""Downloading from the Hugging Face Hub, resumable across runs, into the Hub's own cache.

`huggingface_hub` does the talking (endpoint, token, offline mode, redirects, retries with
`Range` when a connection drops). Its `hf_hub_download` throws a partial file away when the
process stops, so starling-local keeps its own `*.partial` blob beside the cache's blobs and
continues it on the next run, verifies the sha256 the Hub publishes, then files the blob and
its snapshot link exactly where `hf_hub_download` would have: no second copy of a 4 GB file.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starling_local.errors import StarlingError
from starling_local.files import human_bytes, require_free_space
from starling_local.progress import Progress

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class HubError(StarlingError):
    """The Hub could not be reached or does not have what was asked for."""


class ChecksumError(StarlingError):
    """A downloaded file does not match its published sha256."""


@dataclass(frozen=True)
class RemoteFile:
    repo_id: str
    filename: str
    commit: str
    size: int | None
    sha256: str | None


def _hub_error(exc: Exception, what: str) -> HubError:
    from huggingface_hub import errors

    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"{what}: no such repository on the Hub (or it is private: set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{what}: no such revision")
    if isinstance(exc, errors.EntryNotFoundError):
        return HubError(f"{what}: no such file in the repository")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return HubError(f"{what}: HF_HUB_OFFLINE is set and it is not downloaded yet")
    if isinstance(exc, errors.HfHubHTTPError):
        return HubError(f"{what}: the Hub answered {exc.response.status_code}")
    return HubError(f"{what}: cannot reach the Hub ({type(exc).__name__}); check the connection")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises: the Hub's own errors and its HTTP client's."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [
        errors.HfHubHTTPError,
        errors.OfflineModeIsEnabled,
        OSError,
    ]
    for client in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(client).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _route_hub_logging() -> None:
    """huggingface_hub's warnings ("Trying to resume download...") go to our log file: the
    terminal gets progress and, on failure, one line."""
    import logging

    import huggingface_hub.file_download  # noqa: F401  (configures the library's logger)

    from starling_local.paths import ensure, get_paths

    logger = logging.getLogger("huggingface_hub")
    if any(getattr(h, "_starling", False) for h in logger.handlers):
        return
    for old in list(logger.handlers):
        if type(old) is logging.StreamHandler:
            logger.removeHandler(old)
    handler = logging.FileHandler(ensure(get_paths().logs) / "hub.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._starling = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def list_files(repo_id: str, revision: str | None = None) -> tuple[str, dict[str, RemoteFile]]:
    """The commit a revision points to, and the repository's files with sizes and sha256s."""
    from huggingface_hub import HfApi

    _route_hub_logging()
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except _network_errors() as exc:
        raise _hub_error(exc, repo_id) from exc  # type: ignore[arg-type]
    commit = str(info.sha)
    files = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        files[s.rfilename] = RemoteFile(
            repo_id=repo_id,
            filename=s.rfilename,
            commit=commit,
            size=s.size if s.size is not None else (lfs.size if lfs else None),
            sha256=lfs.sha256 if lfs else None,
        )
    return commit, files


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The file from the Hub cache, if a previous download left it there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision or "main")
    return Path(found) if isinstance(found, str) else None


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total, "sha256")
    return digest.hexdigest()


class _BarFactory:
    """Looks like a tqdm class to `huggingface_hub.file_download.http_get`.

    `http_get` counts a chunk before it writes it, so the count is reported (and a progress
    callback may cancel by raising) only once the chunk is on disk (see `_ReportingFile`):
    a cancelled download keeps every byte it received, for the next try to resume from."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress = progress
        self.label = label
        self.bar: _Bar | None = None

    def __call__(self, **kwargs: Any) -> _Bar:
        self.bar = _Bar(self, int(kwargs.get("total") or 0), int(kwargs.get("initial") or 0))
        return self.bar

    def report(self) -> None:
        if self.bar is not None:
            self.progress(self.bar.n, self.bar.total, self.label)


class _ReportingFile:
    """The partial download file: reports progress after each chunk is written."""

    def __init__(self, fh: Any, factory: _BarFactory | None) -> None:
        self.fh, self.factory = fh, factory

    def write(self, data: bytes) -> int:
        written = int(self.fh.write(data))
        if self.factory is not None:
            self.fh.flush()
            self.factory.report()
        return written

    def __getattr__(self, name: str) -> Any:  # tell, seek, truncate
        return getattr(self.fh, name)


class _Bar:
    def __init__(self, factory: _BarFactory, total: int, initial: int) -> None:
        self.factory, self.total, self.n = factory, total, initial

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        self.n += n  # reported when written


def storage_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(str(constants.HF_HUB_CACHE)) / str(
        repo_folder_name(repo_id=repo_id, repo_type="model")
    )


def fetch(
    remote: RemoteFile,
    *,
    revision: str | None = None,
    expected_sha256: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Download `remote` into the Hub cache (resuming a previous partial download), verify its
    sha256, and return the snapshot path, as `hf_hub_download` would."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    _route_hub_logging()
    storage = storage_folder(remote.repo_id)
    pointer = storage / "snapshots" / remote.commit / remote.filename
    what = f"{remote.repo_id}/{remote.filename}"
    expected = expected_sha256 or remote.sha256
    if not pointer.exists():
        url = hf_hub_url(remote.repo_id, remote.filename, revision=remote.commit)
        try:
            meta = get_hf_file_metadata(url)
        except _network_errors() as exc:
            raise _hub_error(exc, what) from exc  # type: ignore[arg-type]
        etag = str(meta.etag)
        size = meta.size if meta.size is not None else remote.size
        if expected is None and SHA256_RE.match(etag):
            expected = etag
        blob = storage / "blobs" / etag
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            partial = blob.with_name(f"{etag}.starling.partial")
            have = partial.stat().st_size if partial.exists() else 0
            if size is not None and have > size:
                partial.unlink()
                have = 0
            require_free_space(blob.parent, max(0, (size or 0) - have), remote.filename)
            bar = _BarFactory(progress, remote.filename) if progress else None
            try:
                with partial.open("ab") as fh:
                    http_get(
                        str(meta.location),
                        _ReportingFile(fh, bar),
                        resume_size=have,
                        headers=build_hf_headers(),
                        expected_size=size,
                        tqdm_class=bar,
                    )
            except _network_errors() as exc:
                got = partial.stat().st_size if partial.exists() else 0
                raise HubError(
                    f"{what}: download interrupted at {human_bytes(got)} "
                    f"({type(exc).__name__}); run the same command again to resume"
                ) from exc
            if expected is not None:
                actual = sha256_of(partial)
                if actual != expected:
                    partial.unlink()
                    raise ChecksumError(
                        f"{what}: sha256 mismatch (expected {expected[:12]}…, got {actual[:12]}…); "
                        "the damaged file was deleted"
                    )
            os.replace(partial, blob)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    if revision and revision != remote.commit and not COMMIT_RE.match(revision):
        refs = storage / "refs" / revision
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(remote.commit)
    return pointer
