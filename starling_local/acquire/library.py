"""The local model library: what has been pulled or converted, and turning `--model` into a path.

Kept as a small JSON file in the data directory, written atomically under a lock, so that a
model name resolves to its file with no network at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from starling_local.acquire.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    is_catalog_name,
    is_repo_file_spec,
    parse_model_ref,
)
from starling_local.acquire.quantize import DEFAULT_QUANT
from starling_local.config import environment, preferences, save_preferences
from starling_local.errors import StarlingError, UsageError
from starling_local.paths import ensure, get_paths


@dataclass
class LibraryEntry:
    """One local model."""

    name: str  # `starling-lm-7b-alpha:Q4_K_M`, or a file stem for local files
    path: str
    quant: str
    size: int
    sha256: str | None
    verified: bool
    source: str  # "huggingface", "modelscope", "converted", "local"
    repo: str | None = None
    revision: str | None = None
    filename: str | None = None
    added: str = ""

    @property
    def exists(self) -> bool:
        return Path(self.path).is_file()

    @property
    def owned(self) -> bool:
        """Whether the library made the file (and `remove` may delete it)."""
        return self.source in OWNED_SOURCES


#: Sources whose files the library made (and so may delete); "local" and "copy" entries name
#: files the user keeps.
OWNED_SOURCES = frozenset({"huggingface", "modelscope", "converted"})


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class ModelLibrary:
    """Read and change the library file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or get_paths().data / "models.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure(self.path.parent)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def entries(self) -> list[LibraryEntry]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            raise StarlingError(f"{self.path}: unreadable model library ({exc})") from exc
        known = {f.name for f in fields(LibraryEntry)}
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise StarlingError(
                f"{self.path}: unreadable model library (not a list of models); move it aside "
                "and `starling pull` or `starling models` rebuilds it"
            )
        try:
            return [LibraryEntry(**{k: v for k, v in item.items() if k in known}) for item in raw]
        except TypeError as exc:
            raise StarlingError(f"{self.path}: unreadable model library ({exc})") from None

    def _write(self, entries: list[LibraryEntry]) -> None:
        from starling_local.files import sweep_orphans

        sweep_orphans(self.path.parent)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps([asdict(e) for e in entries], indent=2), encoding="utf-8")
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def add(self, entry: LibraryEntry) -> LibraryEntry:
        """Register `entry`, replacing any entry of the same name."""
        entry.added = entry.added or now_iso()
        with self._locked():
            entries = [e for e in self.entries() if e.name != entry.name]
            entries.append(entry)
            self._write(entries)
        return entry

    def register(
        self,
        path: Path,
        *,
        name: str,
        source: str,
        quant: str | None = None,
        sha256: str | None = None,
        verified: bool = False,
        repo: str | None = None,
        revision: str | None = None,
    ) -> LibraryEntry:
        """Check that `path` is a runnable GGUF and add it under `name` (the one place entries
        are made from files)."""
        from starling_local.gguf.info import check_runnable

        info = check_runnable(path)
        return self.add(
            LibraryEntry(
                name=name,
                path=str(path if path.is_symlink() else path.resolve()),
                quant=quant or info.quant,
                size=info.size,
                sha256=sha256,
                verified=verified,
                source=source,
                repo=repo,
                revision=revision,
                filename=path.name,
            )
        )

    def find(self, name: str) -> LibraryEntry | None:
        """An entry by exact name, or by model name alone (`starling-lm-7b-alpha`), preferring
        the default quantization, then the newest."""
        entries = [e for e in self.entries() if e.exists]
        lowered = name.lower()
        for e in entries:
            if e.name.lower() == lowered:
                return e
        if ":" in name:
            return None
        matches = [e for e in entries if e.name.lower().split(":", 1)[0] == lowered]
        if not matches:
            return None
        preferred = [e for e in matches if e.quant == DEFAULT_QUANT]
        return (preferred or sorted(matches, key=lambda e: e.added))[-1]

    def default_name(self) -> str | None:
        """The model chosen as the default (`set_default`), if any."""
        return preferences().default_model

    def set_default(self, name: str) -> LibraryEntry:
        """Make a library model the one used when none is named."""
        entry = self.find(name)
        if entry is None:
            raise UsageError(f"no model named {name!r} in the library (see `starling models`)")
        save_preferences(default_model=entry.name)
        return entry

    def remove(self, name: str) -> LibraryEntry:
        """Unregister a model. Its file is deleted only when the library made it (downloaded
        or converted) and no other entry names it: a file the user registered from their own
        folder (`pull ./mine.gguf`), or a copy's, is left where it is."""
        with self._locked():
            entries = self.entries()
            match = next((e for e in entries if e.name.lower() == name.lower()), None)
            if match is None:
                raise UsageError(f"no model named {name!r} in the library (see `starling models`)")
            rest = [e for e in entries if e is not match]
            if match.source in OWNED_SOURCES and not any(e.path == match.path for e in rest):
                path = Path(match.path)
                with contextlib.suppress(FileNotFoundError):
                    if path.is_symlink():
                        path.resolve().unlink()
                    path.unlink()
            self._write(rest)
        return match


def resolve_model(spec: str | None) -> Path:
    """A `--model` value -> an existing GGUF path, without touching the network.

    Accepts a path, a library name (`starling-lm-7b-beta:Q5_K_M` or `starling-lm-7b-beta`), or
    nothing (`$STARLING_MODEL`, then the library's default model).
    """
    spec = spec or environment().model
    library = ModelLibrary()
    if not spec:
        chosen = library.default_name()
        entry = (library.find(chosen) if chosen else None) or library.find(DEFAULT_MODEL)
        entry = entry or _newest(library)
        if entry is None:
            raise UsageError(
                "no model yet: run `starling pull` to download Starling-LM-7B-alpha (Q4_K_M), "
                "or pass --model PATH.gguf"
            )
        return Path(entry.path)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    entry = library.find(spec)
    if entry is not None:
        return Path(entry.path)
    if is_catalog_name(spec):
        ref = parse_model_ref(spec)
        raise UsageError(f"{ref.key} is not downloaded yet: run `starling pull {ref.key}`")
    if is_repo_file_spec(spec):
        raise UsageError(f"{spec} is not downloaded yet: run `starling pull {spec}`")
    known = ", ".join(CATALOG)
    raise UsageError(f"no such model or file: {spec} (catalog names: {known})")


def display_name(path: Path) -> str:
    """The library name of a model file when it has one (so a saved conversation survives the
    file moving, e.g. a re-download), else its path."""
    for entry in ModelLibrary().entries():
        if entry.path == str(path):
            return entry.name
    return str(path)


def _newest(library: ModelLibrary) -> LibraryEntry | None:
    entries = [e for e in library.entries() if e.exists]
    return max(entries, key=lambda e: e.added) if entries else None
