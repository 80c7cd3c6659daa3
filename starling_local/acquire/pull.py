"""`starling pull`: a catalog name, `repo/file.gguf` or a local file -> a verified library entry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from starling_local.acquire.catalog import ModelRef, is_repo_file_spec, parse_model_ref
from starling_local.acquire.hub import (
    ChecksumError,
    HubError,
    cached_file,
    fetch,
    list_files,
    sha256_of,
)
from starling_local.acquire.library import LibraryEntry, ModelLibrary
from starling_local.errors import UsageError
from starling_local.progress import ProgressFactory, progress_bar

SOURCES = ("huggingface", "modelscope")


@dataclass(frozen=True)
class PullTarget:
    """What to download: a repository file, under a library name."""

    name: str
    repo_id: str
    filename: str
    quant: str | None
    catalog_sha256: str | None = None
    modelscope_repo_id: str | None = None
    """The same file's repository on ModelScope (None: no known mirror)."""


def parse_target(spec: str | None, quant: str | None = None) -> PullTarget:
    """`starling-lm-7b-beta:Q5_K_M`, `owner/repo/file.gguf`, or nothing (the default model)."""
    if spec and is_repo_file_spec(spec):
        owner, repo, filename = spec.split("/", 2)
        repo_id = f"{owner}/{repo}"
        quant_tag = quant.upper() if quant else None
        # An explicit repository is taken as the user named it, on whichever source they chose.
        return PullTarget(spec, repo_id, filename, quant_tag, modelscope_repo_id=repo_id)
    ref: ModelRef = parse_model_ref(spec, quant)
    return PullTarget(
        ref.key,
        ref.model.gguf.repo_id,
        ref.filename,
        ref.quant,
        ref.model.gguf.sha256.get(ref.quant),
        ref.model.gguf.modelscope_repo_id,
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def pull(
    spec: str | None,
    *,
    quant: str | None = None,
    source: str = "huggingface",
    revision: str | None = None,
    progress_factory: ProgressFactory | None = None,
) -> LibraryEntry:
    """Download (or find) a model, verify it, register it, and return its library entry."""
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}: choose huggingface or modelscope")
    library = ModelLibrary()
    if spec and Path(spec).expanduser().is_file():
        return register_local(Path(spec).expanduser(), library)
    if spec and _looks_like_a_path(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            raise UsageError(f"{spec}: is a directory; pull a .gguf file in it, or convert it "
                             "with `starling convert` if it holds a checkpoint")  # fmt: skip
        if path.exists():
            raise UsageError(f"{spec}: not a regular file (a FIFO or a device?)")
        raise UsageError(f"{spec}: no such file")
    target = parse_target(spec, quant)
    existing = library.find(target.name)
    if existing is not None and existing.name == target.name and revision is None:
        return existing  # already here: nothing to ask the network
    if source == "modelscope":
        ms_path, ms_commit, ms_sha = _pull_modelscope(target, revision)
        return _register(library, target, ms_path, ms_sha, ms_commit, "modelscope", verified=False)

    with progress_bar(progress_factory, f"Downloading {target.filename}") as bar:
        if _offline():
            cached = cached_file(target.repo_id, target.filename, revision)
            if cached is None:
                raise HubError(
                    f"{target.name}: HF_HUB_OFFLINE is set and the file is not in the Hub cache"
                )
            digest = sha256_of(cached)
            if target.catalog_sha256 and digest != target.catalog_sha256:
                raise ChecksumError(f"{cached}: sha256 does not match the catalog's")
            return _register(
                library,
                target,
                cached,
                digest,
                revision,
                "huggingface",
                verified=bool(target.catalog_sha256),
            )
        commit, files = list_files(target.repo_id, revision)
        remote = files.get(target.filename)
        if remote is None:
            ggufs = sorted(f for f in files if f.endswith(".gguf"))
            raise HubError(
                f"{target.repo_id} has no {target.filename}"
                + (f"; it has: {', '.join(ggufs)}" if ggufs else "")
            )
        if target.catalog_sha256 and remote.sha256 and remote.sha256 != target.catalog_sha256:
            raise ChecksumError(
                f"{target.name}: the Hub's sha256 differs from the catalog's; refusing to download"
            )
        expected = remote.sha256 or target.catalog_sha256
        already = cached_file(target.repo_id, target.filename, commit)
        path = fetch(remote, revision=revision or "main", expected_sha256=expected, progress=bar)
    sha: str | None = expected
    if already is not None or expected is None:
        # Not downloaded (and checked) just now: check what the cache holds.
        sha = sha256_of(path)
        if expected is not None and sha != expected:
            raise ChecksumError(f"{path}: cached file does not match the Hub's sha256")
    return _register(
        library, target, path, sha, commit, "huggingface", verified=expected is not None
    )


def _register(
    library: ModelLibrary,
    target: PullTarget,
    path: Path,
    sha: str | None,
    commit: str | None,
    source: str,
    *,
    verified: bool,
) -> LibraryEntry:
    return library.register(
        path,
        name=target.name,
        source=source,
        quant=target.quant,
        sha256=sha,
        verified=verified,
        repo=target.repo_id,
        revision=commit,
    )


def register_local(path: Path, library: ModelLibrary | None = None) -> LibraryEntry:
    """Add a GGUF file already on disk to the library under its file name."""
    return (library or ModelLibrary()).register(path, name=path.stem, source="local")


def _pull_modelscope(target: PullTarget, revision: str | None) -> tuple[Path, str | None, str]:
    try:
        from modelscope.hub.file_download import (  # type: ignore[import-not-found]
            model_file_download,
        )
    except ImportError:
        raise UsageError(
            "ModelScope downloads need the optional extra: pip install 'starling-local[modelscope]'"
        ) from None
    if target.modelscope_repo_id is None:
        raise UsageError(
            f"{target.name}: no ModelScope mirror of {target.repo_id} is known; "
            "pass a ModelScope file as OWNER/REPO/FILE.gguf"
        )
    try:
        local = model_file_download(
            model_id=target.modelscope_repo_id, file_path=target.filename, revision=revision
        )
    except Exception as exc:  # modelscope raises many unrelated types
        raise HubError(f"{target.modelscope_repo_id}/{target.filename}: ModelScope: {exc}") from exc
    path = Path(local)
    sha = sha256_of(path)
    if target.catalog_sha256 and sha != target.catalog_sha256:
        path.unlink()
        raise ChecksumError(f"{target.name}: sha256 mismatch; the damaged file was deleted")
    return path, revision, sha


def _looks_like_a_path(spec: str) -> bool:
    """`./x`, `/x`, `~/x` or `x.gguf`: a file meant, not a model name or repository."""
    return spec.startswith(("./", "../", "/", "~")) or (
        spec.endswith(".gguf") and spec.count("/") != 2
    )
