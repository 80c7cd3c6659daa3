"""Conversations that resume instantly: each conversation's KV cache saved to disk.

A state file is kept per model file and conversation (the engine checks its header before
llama.cpp sees it, so a file of another model or version is never loaded). Files are removed
with their conversation, and the folder is kept under a size cap by dropping the least recently
used files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from starling_local.config import environment
from starling_local.engine.interface import EngineLike
from starling_local.paths import get_paths


def cache_root() -> Path:
    return get_paths().cache / "kv"


def cap_bytes() -> int:
    return environment().kv_cache_bytes


class ConversationCache:
    """Save and restore one engine's KV cache per conversation."""

    def __init__(
        self, engine: EngineLike, root: Path | None = None, cap: int | None = None
    ) -> None:
        self.engine = engine
        self.root = root or cache_root()
        self.cap = cap if cap is not None else cap_bytes()
        self.folder = self.root / engine.model_key

    def path_for(self, conversation_id: int) -> Path:
        return self.folder / f"conversation-{conversation_id}.kv"

    def save(self, conversation_id: int) -> int:
        """Save the engine's current cache as this conversation's; return the bytes written."""
        written = self.engine.save_state(self.path_for(conversation_id))
        if written:
            self.enforce_cap(keep=self.path_for(conversation_id))
        return written

    def restore(self, conversation_id: int, prompt: Sequence[int]) -> int:
        """Load the saved cache when it covers more of `prompt` than the live one does; return
        the tokens of `prompt` now cached. A file the engine cannot use is deleted by it."""
        live = self.engine.cached_prefix(prompt)
        path = self.path_for(conversation_id)
        if live >= len(prompt) - 1 or not path.exists():
            return live
        # The file's header says what it holds: read its payload only if it covers more.
        saved = self.engine.state_tokens(path)
        covered = next(
            (i for i, (a, b) in enumerate(zip(saved, prompt, strict=False)) if a != b),
            min(len(saved), len(prompt)),
        )
        if covered <= live:
            return live
        if self.engine.load_state(path) == 0:
            return 0
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        return self.engine.cached_prefix(prompt)

    def enforce_cap(self, keep: Path | None = None) -> None:
        files = []
        for p in self.root.glob("*/*.kv"):
            if p != keep:
                with contextlib.suppress(OSError):
                    files.append((p.stat().st_mtime, p.stat().st_size, p))
        files.sort()
        total = sum(size for _, size, _ in files) + (keep.stat().st_size if keep else 0)
        for _, size, old in files:
            if total <= self.cap:
                break
            total -= size
            old.unlink(missing_ok=True)


def forget(conversation_id: int, root: Path | None = None) -> None:
    """Remove a conversation's saved caches (for every model)."""
    for path in (root or cache_root()).glob(f"*/conversation-{conversation_id}.kv"):
        path.unlink(missing_ok=True)


def copy_states(source_id: int, target_id: int, root: Path | None = None) -> int:
    """Give conversation `target_id` the saved caches of `source_id` (a branch starts from its
    parent's cache: the shared history is not evaluated again); the number of files."""
    count = 0
    for path in (root or cache_root()).glob(f"*/conversation-{source_id}.kv"):
        target = path.with_name(f"conversation-{target_id}.kv")
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)  # saving replaces a file, never writes into it: safe to share
        except OSError:
            shutil.copyfile(path, target)
        count += 1
    return count
