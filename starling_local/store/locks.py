"""One writer per conversation across processes: an advisory lock file per conversation
(`flock`, released by the kernel if its holder dies), held from a message's commit to its
reply's end, so two processes continuing one conversation take turns and each prompt holds
the previous reply."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from starling_local.errors import StarlingError


class ConversationBusyError(StarlingError):
    """Another process is replying in the conversation and did not finish in time."""


def lock_path(database: Path, conversation_id: int) -> Path:
    return database.parent / "locks" / f"conversation-{conversation_id}.lock"


@contextlib.contextmanager
def conversation_lock(
    database: Path,
    conversation_id: int,
    *,
    wait_s: float = 600.0,
    on_wait: Callable[[], object] | None = None,
) -> Iterator[None]:
    """Hold conversation `conversation_id`'s lock; wait for another holder up to `wait_s`
    (`on_wait` is told once that it waits), then `ConversationBusyError`."""
    path = lock_path(database, conversation_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait()
                    told = True
                if time.monotonic() > deadline:
                    raise ConversationBusyError(
                        f"another starling process is replying in conversation "
                        f"{conversation_id} (waited {wait_s:.0f} s)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
