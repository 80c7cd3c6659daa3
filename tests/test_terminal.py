"""A smoke test of the installed `starling chat` in a real terminal (tmux)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


#: A tmux server of the tests' own (its own socket, no config): a server started elsewhere
#: would lend its sessions its environment (a STARLING_MODEL set there, say).
TMUX = ["tmux", "-L", f"starling-tests-{os.getpid()}", "-f", "/dev/null"]


def tmux(*args: str) -> str:
    return subprocess.run([*TMUX, *args], capture_output=True, text=True, check=False).stdout


def alive(session: str) -> bool:
    return (
        subprocess.run([*TMUX, "has-session", "-t", session], capture_output=True).returncode == 0
    )


@contextlib.contextmanager
def terminal(session: str, command: str) -> Iterator[str]:
    """`command` running in a 120x40 tmux session, killed when the block ends."""
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", command)
    try:
        yield session
    finally:
        subprocess.run([*TMUX, "kill-session", "-t", session], capture_output=True)


def wait_for(session: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; the screen was:\n{screen}")


def app_with_hub(hub: Any, home: Path, hf: Path, extra: str = "") -> str:
    """The installed `starling chat` command line, with the Hub stand-in as its Hub."""
    starling = Path(sys.executable).with_name("starling")
    return (
        f"env STARLING_HOME={home} HF_HOME={hf} HF_ENDPOINT={hub.endpoint} "
        f"{starling} chat --ctx 1024 {extra}"
    ).strip()


def select_default_download(session: str) -> None:
    """From the first-run screen: F5, then down to Starling-LM-7B-alpha Q4_K_M, then Enter."""
    from starling_local.acquire.catalog import CATALOG

    quants = list(CATALOG["starling-lm-7b-alpha"].gguf.sizes)
    wait_for(session, "Download Starling-LM-7B-alpha Q4_K_M")  # the first-run offer
    tmux("send-keys", "-t", session, "F5")
    wait_for(session, "starling-lm-7b-alpha:Q2_K")
    for _ in range(quants.index("Q4_K_M")):
        tmux("send-keys", "-t", session, "Down")
    tmux("send-keys", "-t", session, "Enter")


def test_chat_in_a_real_terminal(eager_gguf: Path, starling_home: Path) -> None:
    from starling_local.store.conversations import ConversationStore

    store = ConversationStore(starling_home / "data" / "starling.db")
    # Greedy: the eager model's reply is the same every run (sampled, it sometimes ends at once).
    conv = store.create(params={"temperature": 0.0})
    session = f"starling-{os.getpid()}"
    starling = Path(sys.executable).with_name("starling")
    command = (
        f"env STARLING_HOME={starling_home} {starling} chat --model {eager_gguf} --ctx 1024 "
        f"--conversation {conv.id}"
    )
    with terminal(session, command):
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
    user, reply = store.get(conv.id).messages
    assert user.content == "Hello from tmux"
    assert reply.content and reply.stop_reason == "end_of_turn"


QUITS = 20


def test_quit_mid_reply_twenty_times(tiny_q4: Path, starling_home: Path, tmp_path: Path) -> None:
    """Ctrl+Q while a reply streams, in a real terminal, 20 times in a row: every exit is clean
    (status 0, no SIGSEGV) and every partial reply is saved, marked stopped."""
    from starling_local.store.conversations import ConversationStore

    starling = Path(sys.executable).with_name("starling")
    store = ConversationStore(starling_home / "data" / "starling.db")
    # Greedy: this prompt's reply is the same 2,548 tokens every time (the random model would
    # sometimes sample <|end_of_turn|> early and finish before the quit). One thread: on a fast
    # machine two decode the whole reply in under two seconds, which a busy terminal can take
    # to deliver Ctrl+Q.
    pin = "taskset -c 0 " if shutil.which("taskset") else ""
    params = {"temperature": 0.0, "max_tokens": 4000}
    ids = [store.create(title=f"quit {i}", params=params).id for i in range(QUITS)]
    statuses = []
    for i, cid in enumerate(ids):
        session = f"starling-quit-{os.getpid()}-{i}"
        rc_file = tmp_path / f"rc-{i}"
        command = (
            f"env STARLING_HOME={starling_home} {pin}{starling} chat --model {tiny_q4} "
            f"--ctx 4096 --conversation {cid}; echo $? > {rc_file}"
        )
        with terminal(session, command):
            wait_for(session, "tiny-q4_k_m.gguf", timeout=60)  # loaded (slow on a busy machine)
            tmux("send-keys", "-t", session, "-l", "Go on and on")
            tmux("send-keys", "-t", session, "Enter")
            wait_for(session, "tok/s")  # the reply is streaming
            tmux("send-keys", "-t", session, "C-q")
            deadline = time.monotonic() + 20
            while not rc_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            statuses.append(rc_file.read_text().strip() if rc_file.exists() else "hung")
    assert statuses == ["0"] * QUITS
    replies = [store.get(cid).messages[-1] for cid in ids]
    assert len(replies) == QUITS
    assert all(r.role == "assistant" and r.content for r in replies)
    assert [(r.incomplete, r.stop_reason) for r in replies] == [(True, "cancelled")] * QUITS


def test_download_a_model_inside_the_app_and_chat(
    eager_gguf: Path, starling_home: Path, tmp_path: Path
) -> None:
    """The installed app with no model, the Hub stand-in on 127.0.0.1: F5, pick the default
    model, Enter downloads it (verified), the app loads it, and it answers."""
    from starling_local.store.conversations import ConversationStore
    from tests.fake_hub import FakeHub, start

    hub = FakeHub()
    hub.add_repo(
        "TheBloke/Starling-LM-7B-alpha-GGUF",
        {"starling-lm-7b-alpha.Q4_K_M.gguf": eager_gguf.read_bytes()},
    )
    servers = start(hub)
    db = starling_home / "data" / "starling.db"
    conv = ConversationStore(db).create(params={"temperature": 0.0})  # greedy: a steady reply
    session = f"starling-dl-{os.getpid()}"
    command = app_with_hub(hub, starling_home, tmp_path / "hf", f"--conversation {conv.id}")
    try:
        with terminal(session, command):
            select_default_download(session)
            wait_for(session, "downloaded, verified", timeout=60)
            tmux("send-keys", "-t", session, "Escape")
            wait_for(
                session, "starling-lm-7b-alpha.Q4_K_M.gguf", timeout=60
            )  # loaded, in the status
            tmux("send-keys", "-t", session, "-l", "Hello from the download")
            tmux("send-keys", "-t", session, "Enter")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not replied(db):
                time.sleep(0.2)
            tmux("send-keys", "-t", session, "C-q")
    finally:
        for server in servers:
            server.shutdown()
    store = ConversationStore(db)
    user, reply = store.get(conv.id).messages
    conv = store.get(conv.id)
    assert user.content == "Hello from the download"
    assert reply.content and reply.stop_reason == "end_of_turn"
    assert "starling-lm-7b-alpha:Q4_K_M" in conv.model  # the downloaded, registered model


def replied(db: Path) -> bool:
    from starling_local.store.conversations import ConversationStore

    if not db.exists():
        return False
    store = ConversationStore(db)
    try:
        convs = store.conversations()
        messages = store.get(convs[0].id).messages if convs else []
        last = messages[-1] if messages else None
        return last is not None and last.role == "assistant" and last.stop_reason is not None
    finally:
        store.close()


def test_cancel_a_download_inside_the_app_then_resume_it(
    eager_gguf: Path, starling_home: Path, tmp_path: Path
) -> None:
    """The installed app, a slow Hub stand-in on 127.0.0.1: Enter starts the download with a
    progress line (speed, ETA), c cancels it (nothing registered, the app keeps running), and
    the next Enter resumes where it stopped (an HTTP Range request) and verifies the file."""
    from tests.fake_hub import FakeHub, start

    name = "starling-lm-7b-alpha.Q4_K_M.gguf"
    data = eager_gguf.read_bytes()
    hub = FakeHub()
    hub.add_repo("TheBloke/Starling-LM-7B-alpha-GGUF", {name: data})
    hub.throttle[name] = 0.25  # 4 MiB/s: a few seconds for the whole file
    servers = start(hub)
    session = f"starling-cancel-{os.getpid()}"
    try:
        with terminal(session, app_with_hub(hub, starling_home, tmp_path / "hf")):
            select_default_download(session)
            wait_for(session, "Downloading")
            tmux("send-keys", "-t", session, "c")
            wait_for(session, "cancelled")
            served = hub.bytes_served.get(name, 0)
            assert 0 < served < len(data)
            assert alive(session)
            hub.throttle[name] = 0.0
            tmux("send-keys", "-t", session, "Enter")
            wait_for(session, "downloaded, verified", timeout=60)
            tmux("send-keys", "-t", session, "Escape")
            tmux("send-keys", "-t", session, "C-q")
    finally:
        for server in servers:
            server.shutdown()
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and "/cdn/" in path]
    assert ranges[0] is None and ranges[-1] is not None  # the second try asked for the rest
    assert int(ranges[-1].removeprefix("bytes=").rstrip("-")) > 0
    models = starling_home / "data" / "starling.db"
    assert models.exists()


@pytest.mark.parametrize("sig", ["TERM", "HUP"])
def test_sigterm_and_sighup_save_the_streaming_reply(
    talker_gguf: Path, starling_home: Path, sig: str
) -> None:
    """`kill` and a closed terminal quit the app as Ctrl+Q does: the streaming reply is saved,
    marked stopped, with its KV state."""
    from starling_local.store.conversations import ConversationStore

    starling = Path(sys.executable).with_name("starling")
    store = ConversationStore(starling_home / "data" / "starling.db")
    cid = store.create(params={"temperature": 0.0, "max_tokens": 4000}).id
    session = f"starling-{sig.lower()}-{os.getpid()}"
    command = (
        f"exec env STARLING_HOME={starling_home} {starling} chat --model {talker_gguf} "
        f"--ctx 4096 --conversation {cid}"
    )
    with terminal(session, command):
        wait_for(session, "talker-f16.gguf", timeout=60)
        tmux("send-keys", "-t", session, "-l", "Go on and on")
        tmux("send-keys", "-t", session, "Enter")
        wait_for(session, "tok/s")  # the reply is streaming
        pid = int(tmux("display-message", "-p", "-t", session, "#{pane_pid}").strip())
        subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
        deadline = time.monotonic() + 20
        while alive(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(session)
    user, reply = store.get(cid).messages
    store.close()
    assert user.content == "Go on and on"
    assert reply.content and reply.stop_reason == "cancelled" and reply.incomplete
    assert list((starling_home / "cache" / "kv").glob("*/*.kv"))  # its KV state was saved
