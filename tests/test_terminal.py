"""A smoke test of the installed `starling chat` in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False).stdout


def alive(session: str) -> bool:
    return (
        subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0
    )


def wait_for(session: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; the screen was:\n{screen}")


def test_chat_in_a_real_terminal(eager_gguf: Path, starling_home: Path) -> None:
    session = f"starling-{os.getpid()}"
    starling = Path(sys.executable).with_name("starling")
    command = f"env STARLING_HOME={starling_home} {starling} chat --model {eager_gguf} --ctx 1024"
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", command)
    try:
        wait_for(session, "eager-f16.gguf")  # the model has loaded
        tmux("send-keys", "-t", session, "-l", "Hello from tmux")
        tmux("send-keys", "-t", session, "Enter")
        screen = wait_for(session, "Starling")
        assert "Hello from tmux" in screen
        wait_for(session, "tok/s")  # the reply streamed and finished
        tmux("send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 10
        while alive(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(session)  # Ctrl+Q quit the app, which ended the session
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    from starling_local.store.conversations import ConversationStore

    store = ConversationStore(starling_home / "data" / "starling.db")
    [conv] = store.conversations()
    assert [m.role for m in store.get(conv.id).messages] == ["user", "assistant"]
