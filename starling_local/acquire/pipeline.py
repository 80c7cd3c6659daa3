"""Checkpoint -> GGUF -> quantized GGUF, as one step with one set of guarantees."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starling_local.acquire.convert import OutType, convert_checkpoint
from starling_local.acquire.quantize import normalize_quant, quantize
from starling_local.errors import UsageError
from starling_local.files import partial_path
from starling_local.paths import ensure, get_paths
from starling_local.progress import ProgressFactory, progress_bar

if TYPE_CHECKING:
    from starling_local.acquire.library import LibraryEntry

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
    done = 0
    paths = []
    with progress_bar(progress_factory, f"Downloading {repo_id}") as bar:
        for remote in sorted(wanted, key=lambda f: f.size or 0):

            def step(n: int, _total: int, what: str = "", base: int = done, /) -> None:
                if bar is not None:
                    bar(base + n, total, what)

            paths.append(fetch(remote, revision=revision or "main", progress=step))
            done += remote.size or 0
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


def _intermediate(final: Path, folder: Path, base: str, kind: OutType, keep: bool) -> Path:
    """Where the unquantized GGUF goes when it is only a step towards quantized files."""
    if not keep:
        return partial_path(final).with_suffix(f".{kind.value}.gguf")
    if final.parent != folder or final.name != f"{base}-{kind.value}.gguf":
        return final.with_name(f"{final.stem}.{kind.value}.gguf")
    return folder / f"{base}-{kind.value}.gguf"


def convert(
    source: str,
    *,
    quants: Sequence[str] = (),
    outtype: str = "f16",
    out: Path | None = None,
    out_dir: Path | None = None,
    revision: str | None = None,
    keep_intermediate: bool = False,
    keep_checkpoint: bool = False,
    n_threads: int = 0,
    progress_factory: ProgressFactory | None = None,
) -> list[LibraryEntry]:
    """Convert a checkpoint (a directory, or a Hub repo id: only the files conversion needs are
    downloaded) to GGUF once, quantize it to each of `quants`, register every result in the
    model library, and return the entries.

    Without `quants` the converted GGUF is the result. With them it is an intermediate, removed
    afterwards unless `keep_intermediate`. `out` names the one result file; `out_dir` the folder
    results go to (default: the models folder). Nothing is left under a final name unless it is
    complete.
    """
    from starling_local.acquire.library import ModelLibrary

    try:
        kind = OutType(outtype)
    except ValueError:
        raise UsageError(f"unknown --outtype {outtype!r}: choose f32, f16 or bf16") from None
    quants = list(dict.fromkeys(normalize_quant(q) for q in quants))
    if out is not None and len(quants) > 1:
        raise UsageError("--out names one file: with several quants use --out-dir")
    if out is not None and out.suffix != ".gguf":
        raise UsageError(f"{out}: the output should end in .gguf")
    got = (
        download_checkpoint(source, revision, progress_factory)
        if looks_like_repo_id(source)
        else None
    )
    directory = got.directory if got else Path(source)
    base = _base_name(source) if got else directory.name.lower()
    folder = ensure(out_dir or (out.parent if out else get_paths().models))
    repo, commit = (source, got.commit) if got else (None, None)
    library = ModelLibrary()
    results: list[LibraryEntry] = []

    def register(path: Path, tag: str) -> None:
        # At once: a process killed during the next quant leaves no unregistered result.
        results.append(
            library.register(
                path, name=f"{base}:{tag}", source="converted", repo=repo, revision=commit
            )
        )

    converted = out if out is not None and not quants else folder / f"{base}-{kind.value}.gguf"
    if quants:
        first = out or folder / f"{base}-{quants[0].lower()}.gguf"
        converted = _intermediate(first, folder, base, kind, keep_intermediate)
    try:
        with progress_bar(progress_factory, "Converting") as bar:
            convert_checkpoint(directory, converted, kind, bar, name=base)
        if not quants:
            register(converted, kind.value.upper())
        for quant in quants:
            final = out or folder / f"{base}-{quant.lower()}.gguf"
            with progress_bar(progress_factory, f"Quantizing to {quant}") as bar:
                quantize(converted, final, quant, n_threads, progress=bar)
            register(final, quant)
    finally:
        if quants and not keep_intermediate:
            converted.unlink(missing_ok=True)
        if got is not None and not keep_checkpoint:
            _remove_download(got)
    return results
