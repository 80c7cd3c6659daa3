"""Checkpoint -> GGUF -> quantized GGUF, as one step with one set of guarantees."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starling_local.acquire.convert import OutType, convert_checkpoint
from starling_local.acquire.files import partial_path
from starling_local.acquire.quantize import normalize_quant, quantize
from starling_local.errors import UsageError
from starling_local.paths import ensure, get_paths

if TYPE_CHECKING:
    from starling_local.acquire.library import LibraryEntry

ProgressFactory = Callable[[str], Any]

#: The files conversion reads; nothing else of a checkpoint repository is downloaded.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "model.safetensors.index.json",
)
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID_RE.match(source)) and not Path(source).exists()


@dataclass
class Downloaded:
    directory: Path
    repo_id: str
    commit: str
    files: list[Path]


def download_checkpoint(
    repo_id: str, revision: str | None = None, progress_factory: ProgressFactory | None = None
) -> Downloaded:
    """Download only what conversion needs from a checkpoint repository (into the Hub cache)."""
    from starling_local.acquire.hub import HubError, fetch, list_files

    commit, files = list_files(repo_id, revision)
    wanted = [
        f
        for name, f in files.items()
        if name in CHECKPOINT_FILES or (name.endswith(".safetensors") and "/" not in name)
    ]
    if not any(f.filename.endswith(".safetensors") for f in wanted):
        raise HubError(f"{repo_id}: no .safetensors weights to convert")
    total = sum(f.size or 0 for f in wanted)
    bar = progress_factory(f"Downloading {repo_id}") if progress_factory else None
    done = 0
    paths = []
    try:
        for remote in sorted(wanted, key=lambda f: f.size or 0):

            def step(n: int, _total: int, what: str, base: int = done) -> None:
                if bar is not None:
                    bar(base + n, total, what)

            paths.append(fetch(remote, revision=revision or "main", progress=step))
            done += remote.size or 0
    finally:
        if bar is not None:
            bar.close()
    return Downloaded(paths[0].parent, repo_id, commit, paths)


def _remove_download(got: Downloaded) -> None:
    for p in got.files:
        with contextlib.suppress(OSError):
            p.resolve().unlink()
            p.unlink()


def _base_name(repo_id: str) -> str:
    """The catalog name of a checkpoint repository, or the repository's own name."""
    from starling_local.acquire.catalog import CATALOG

    known = next((m.name for m in CATALOG.values() if m.checkpoint_repo == repo_id), None)
    return known or repo_id.split("/")[-1].lower()


def _register_converted(
    path: Path, name: str, repo: str | None, commit: str | None
) -> LibraryEntry:
    from starling_local.acquire.library import ModelLibrary

    return ModelLibrary().register(path, name=name, source="converted", repo=repo, revision=commit)


def convert_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    quant: str | None,
    outtype: str = "f16",
    out: Path | None = None,
    keep_intermediate: bool = False,
    keep_checkpoint: bool = False,
    n_threads: int = 0,
    progress_factory: ProgressFactory | None = None,
) -> LibraryEntry:
    """Download a checkpoint, convert (and quantize) it, and register the result."""
    got = download_checkpoint(repo_id, revision, progress_factory)
    base = _base_name(repo_id)
    tag = normalize_quant(quant) if quant else outtype.upper()
    final = out or ensure(get_paths().models) / f"{base}-{tag.lower()}.gguf"
    try:
        path = convert_and_quantize(
            got.directory,
            out=final,
            outtype=outtype,
            quant=quant,
            keep_intermediate=keep_intermediate,
            n_threads=n_threads,
            progress_factory=progress_factory,
        )
    finally:
        if not keep_checkpoint:
            _remove_download(got)
    return _register_converted(path, f"{base}:{tag}", repo_id, got.commit)


def default_output(source: Path, tag: str) -> Path:
    """`<models dir>/<checkpoint name>-<tag>.gguf`."""
    return ensure(get_paths().models) / f"{source.name.lower()}-{tag}.gguf"


def convert_and_quantize(
    source: Path,
    *,
    out: Path | None = None,
    outtype: str = "f16",
    quant: str | None = None,
    keep_intermediate: bool = False,
    n_threads: int = 0,
    progress_factory: ProgressFactory | None = None,
) -> Path:
    """Convert `source` (and quantize when `quant` is given); return the final GGUF path.

    With `quant`, the unquantized GGUF is an intermediate: it is removed afterwards unless
    `keep_intermediate`, in which case it stays beside the result as `<name>.<outtype>.gguf`.
    """
    try:
        kind = OutType(outtype)
    except ValueError:
        raise UsageError(f"unknown --outtype {outtype!r}: choose f32, f16 or bf16") from None
    quant = normalize_quant(quant) if quant else None
    final = out or default_output(source, quant or kind.value)
    if final.suffix != ".gguf":
        raise UsageError(f"{final}: the output should end in .gguf")

    def bar(label: str) -> Any:
        return progress_factory(label) if progress_factory else None

    if quant is None:
        progress = bar("Converting")
        try:
            return convert_checkpoint(source, final, kind, progress, name=source.name)
        finally:
            if progress is not None:
                progress.close()

    if keep_intermediate:
        intermediate = final.with_name(f"{final.stem}.{kind.value}.gguf")
    else:
        intermediate = partial_path(final).with_suffix(f".{kind.value}.gguf")
    try:
        progress = bar("Converting")
        try:
            convert_checkpoint(source, intermediate, kind, progress, name=source.name)
        finally:
            if progress is not None:
                progress.close()
        progress = bar(f"Quantizing to {quant}")
        try:
            quantize(intermediate, final, quant, n_threads, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    finally:
        if not keep_intermediate:
            with contextlib.suppress(OSError):
                intermediate.unlink()
    return final


def batch_convert(
    source: str,
    *,
    quants: list[str],
    out_dir: Path | None = None,
    outtype: str = "f16",
    keep_intermediate: bool = False,
    keep_checkpoint: bool = False,
    progress_factory: ProgressFactory | None = None,
) -> list[LibraryEntry]:
    """Convert one checkpoint (directory or repo id) once, quantize it to every quant in
    `quants`, register each result, and return the entries."""
    quants = [normalize_quant(q) for q in quants]
    kind = OutType(outtype)
    got = (
        download_checkpoint(source, None, progress_factory) if looks_like_repo_id(source) else None
    )
    directory = got.directory if got else Path(source)
    base = _base_name(source) if got else directory.name.lower()
    folder = ensure(out_dir or get_paths().models)
    intermediate = folder / f"{base}-{kind.value}.gguf"
    entries = []

    def bar(label: str) -> Any:
        return progress_factory(label) if progress_factory else None

    try:
        progress = bar("Converting")
        try:
            convert_checkpoint(directory, intermediate, kind, progress, name=base)
        finally:
            if progress is not None:
                progress.close()
        for quant in quants:
            out = folder / f"{base}-{quant.lower()}.gguf"
            progress = bar(f"Quantizing to {quant}")
            try:
                quantize(intermediate, out, quant, progress=progress)
            finally:
                if progress is not None:
                    progress.close()
            repo, commit = (source, got.commit) if got else (None, None)
            entries.append(_register_converted(out, f"{base}:{quant}", repo, commit))
    finally:
        if not keep_intermediate:
            intermediate.unlink(missing_ok=True)
        if got is not None and not keep_checkpoint:
            _remove_download(got)
    return entries
