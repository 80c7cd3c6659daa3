"""`starling serve` under hostile traffic: malformed and huge bodies, idle and slow sockets
under a descriptor limit, cross-site and DNS-rebinding requests, signals with a queue, a remote
engine killed mid-stream. Each case checks the status, that the server is still alive, and
that a refused request saved nothing. All traffic goes to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from starling_local.store.conversations import ConversationStore
from tests.server_helpers import READY, Served, serve

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def saving(tiny_q4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tiny_q4, tmp_path_factory.mktemp("hostile"), "--ctx", "2048", "--save") as s:
        yield s


def conversations(served: Served) -> int:
    store = ConversationStore(served.home / "data" / "starling.db")
    try:
        return len(store.conversations())
    finally:
        store.close()


def alive(served: Served) -> bool:
    return httpx.get(f"{served.url}/health", timeout=5).status_code == 200


def chat(served: Served, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{served.v1}/chat/completions", content=content, timeout=60, **kw)


def test_lone_surrogates_become_the_replacement_character(saving: Served) -> None:
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    assert chat(saving, raw).status_code == 200
    tokenized = httpx.post(f"{saving.url}/tokenize", content=b'{"content": "a\\udfffb"}').json()
    text = httpx.post(f"{saving.url}/detokenize", json={"tokens": tokenized["tokens"]}).json()
    assert text["content"].strip() == "a\ufffdb"
    completion = httpx.post(
        f"{saving.v1}/completions", content=b'{"prompt": "x \\ud800", "max_tokens": 2}'
    )
    assert completion.status_code == 200 and alive(saving)


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "hi"}], "x": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}",
        b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        b'{"messages": [{"role": "user", "content": {"nested": {"a": {"b": 1}}}}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "hi"}], "stop": [' + b'"s",' * 100 + b'"s"]}',
        b"\xff\xfe{not utf-8",
        b'{"messages": [{"role": "user", "content": "' + b"llama " * 3000 + b'"}]}',
    ],
)
def test_malformed_bodies_are_4xx_and_save_nothing(saving: Served, body: bytes) -> None:
    before = conversations(saving)
    r = chat(saving, body)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert alive(saving) and conversations(saving) == before


def _health_latency(url: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        out.append(time.perf_counter() - start)
        time.sleep(0.05)


def test_huge_bodies_never_block_health(saving: Served) -> None:
    stop, latencies = threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(target=_health_latency, args=(saving.url, stop, latencies))
    watcher.start()
    try:
        started = time.perf_counter()
        big_text = "llama " * 340_000  # 2 MB to tokenize
        r = httpx.post(f"{saving.url}/tokenize", json={"content": big_text}, timeout=120)
        assert r.status_code == 200 and r.json()["count"] > 300_000
        ids = httpx.post(f"{saving.url}/detokenize", json={"tokens": [22557] * 65536}, timeout=60)
        assert ids.status_code == 200 and len(ids.json()["content"]) > 300_000
        over = httpx.post(f"{saving.url}/detokenize", json={"tokens": [22557] * 600_000})
        assert over.status_code == 413 and over.json()["error"]["code"] == "too_many_tokens"
        prompt = httpx.post(f"{saving.v1}/completions", json={"prompt": big_text}, timeout=120)
        assert prompt.status_code == 400  # longer than the context, found off the event loop
        assert prompt.json()["error"]["code"] == "context_length_exceeded"
        took = time.perf_counter() - started
    finally:
        stop.set()
        watcher.join()
    assert len(latencies) >= 3 and took > 0.3, (took, latencies)
    assert max(latencies) < 1.0, latencies


def _start(
    model: Path, home: Path, *args: str, nofile: int | None = None, ctx: str = "512"
) -> subprocess.Popen[str]:
    """`starling serve` in a subprocess of our own (to signal it, or limit its descriptors)."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    env = dict(os.environ, STARLING_HOME=str(home))
    return subprocess.Popen(
        [sys.executable, "-m", "starling_local", "serve", "--model", str(model), "--port", "0",
         "--ctx", ctx, *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, preexec_fn=limit,
    )  # fmt: skip


def _url_of(process: subprocess.Popen[str]) -> str:
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = READY.search(process.stderr.readline())
        if found:
            return f"http://127.0.0.1:{found.group(1)}"
    raise AssertionError("the server did not start")


def test_idle_and_slow_sockets_under_a_descriptor_limit(tiny_q4: Path, tmp_path: Path) -> None:
    process = _start(tiny_q4, tmp_path, "--quiet", nofile=256)
    sockets: list[socket.socket] = []
    try:
        url = _url_of(process)
        port = int(url.rsplit(":", 1)[1])
        for _ in range(300):  # more idle sockets than descriptors
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(s)
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - start < 1.0
        # A slowloris: 20 clients each sending a request head a byte at a time.
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        closed_at: list[float] = []
        t0 = time.monotonic()
        for i in range(len(head)):
            for s in list(slow):
                try:
                    s.send(head[i : i + 1])
                except OSError:
                    slow.remove(s)
                    closed_at.append(time.monotonic() - t0)
            if not slow:
                break
            time.sleep(0.25)
        assert not slow, "a client sending its head a byte at a time was never dropped"
        assert max(closed_at) < 15  # the head timeout is 10 s
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        for s in sockets:
            s.close()
        process.terminate()
        process.wait(20)


def test_cross_site_and_rebinding_requests_are_refused(saving: Served) -> None:
    before = conversations(saving)
    body = json.dumps({"messages": HELLO, "max_tokens": 2})
    # A web page's "simple" cross-site POST: text/plain, no preflight, but an Origin.
    r = httpx.post(
        f"{saving.v1}/chat/completions",
        content=body,
        headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    form = httpx.post(
        f"{saving.v1}/chat/completions",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "null"},
    )
    assert form.status_code == 403
    # DNS rebinding: a page whose own name now resolves to 127.0.0.1.
    rebound = httpx.get(f"{saving.v1}/models", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403
    assert conversations(saving) == before
    # curl -d: no Origin, form content type: served. Loopback origins may call it.
    assert httpx.post(f"{saving.v1}/chat/completions", content=body).status_code == 200
    local = httpx.post(
        f"{saving.v1}/chat/completions", content=body, headers={"Origin": "http://localhost:3000"}
    )
    assert local.status_code == 200
    assert httpx.options(f"{saving.v1}/chat/completions").status_code == 405  # no CORS asked


def test_cors_origins_get_preflights_and_headers(tiny_q4: Path, tmp_path: Path) -> None:
    app = "http://app.example:5173"
    with serve(tiny_q4, tmp_path, "--ctx", "512", "--cors-origin", app) as s:
        pre = httpx.options(
            f"{s.v1}/chat/completions",
            headers={
                "Origin": app,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == app
        r = httpx.get(f"{s.v1}/models", headers={"Origin": app})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app
        other = httpx.get(f"{s.v1}/models", headers={"Origin": "http://other.example"})
        assert other.status_code == 403


def test_credentials_that_are_not_ascii_are_a_401(tiny_q4: Path, tmp_path: Path) -> None:
    with serve(tiny_q4, tmp_path, "--ctx", "512", "--api-key", "clé") as s:
        wrong = httpx.get(f"{s.v1}/models", headers={"Authorization": "Bearer ключ".encode()})
        assert wrong.status_code == 401
        right = httpx.get(f"{s.v1}/models", headers={"Authorization": "Bearer clé".encode()})
        assert right.status_code == 200


def test_every_request_is_logged_on_stderr(tiny_q4: Path, tmp_path: Path) -> None:
    process = _start(tiny_q4, tmp_path, "--log-level", "debug")
    try:
        url = _url_of(process)
        httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        httpx.get(f"{url}/v1/nothing")
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    chat_line = next(line for line in err.splitlines() if "POST /v1/chat/completions" in line)
    assert " 200 prompt=17 completion=3 cached=0 " in chat_line and '"max_tokens": 3' in chat_line
    assert any("GET /v1/nothing 404" in line for line in err.splitlines())


def test_sigterm_cancels_the_running_and_queued_replies(tiny_q4: Path, tmp_path: Path) -> None:
    process = _start(tiny_q4, tmp_path, "--save", "--quiet", ctx="4096")
    url = _url_of(process)
    long = {"max_tokens": 4000, "ignore_eos": True, "stream": True}

    def ask(i: int) -> list[str]:
        body = {"messages": [{"role": "user", "content": f"go {i}"}], **long}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            return [r.status_code, *r.iter_lines()]  # type: ignore[list-item]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, i) for i in range(4)]
        time.sleep(2.0)  # the first reply streams, three wait for the engine
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        took = time.monotonic() - start
        results = [f.result(timeout=30) for f in futures]
    assert process.returncode == 0 and took < 5, took
    streamed = [r for r in results if r[0] == 200]
    assert len(streamed) == 1
    events = [json.loads(line[6:]) for line in streamed[0][1:] if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "cancelled"  # an error event, not "stop"
    assert all(e.get("choices", [{}])[0].get("finish_reason") is None for e in events[:-1])
    assert sorted(r[0] for r in results if r[0] != 200) == [503, 503, 503]
    store = ConversationStore(tmp_path / "data" / "starling.db")
    (conv,) = [store.get(c.id) for c in store.conversations()]
    reply = conv.messages[-1]
    assert reply.role == "assistant" and reply.stop_reason == "cancelled" and reply.content
    store.close()


def test_a_remote_killed_mid_stream_ends_with_an_error_event(tiny_q4: Path, tmp_path: Path) -> None:
    remote = _start(tiny_q4, tmp_path / "remote", "--quiet")
    try:
        remote_url = _url_of(remote)
        with serve(tiny_q4, tmp_path / "front", "--remote", remote_url, "--quiet") as front:
            body = {"messages": HELLO, "max_tokens": 3000, "ignore_eos": True, "stream": True}
            lines = []
            with httpx.stream("POST", f"{front.v1}/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 20:
                        remote.kill()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
            assert not any(
                e.get("choices") and e["choices"][0].get("finish_reason") for e in events
            )
            assert "data: [DONE]" not in lines
            whole = httpx.post(
                f"{front.v1}/chat/completions", json={"messages": HELLO, "max_tokens": 3}
            )
            assert 500 <= whole.status_code < 600 and alive(front)
    finally:
        remote.kill()
        remote.wait(20)


def test_stalled_bodies_are_evicted_and_timed_out(tiny_q4: Path, tmp_path: Path) -> None:
    """600 clients that send a request head and one byte of its body: they count toward the
    connection cap and make room like idle ones, so /health keeps answering; and a body that
    never arrives is dropped after the body timeout (30 s)."""
    process = _start(tiny_q4, tmp_path, "--quiet", nofile=256)
    stalled: list[socket.socket] = []
    try:
        url = _url_of(process)
        port = int(url.rsplit(":", 1)[1])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        first.sendall(head)
        t0 = time.monotonic()
        for _ in range(600):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(head)
            stalled.append(s)
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - start < 2.0
        # The first one was evicted to make room, or is closed by the body timeout.
        first.settimeout(45)
        try:
            closed = first.recv(1024) == b""
        except OSError:
            closed = True
        assert closed and time.monotonic() - t0 < 45
    finally:
        for s in stalled:
            s.close()
        process.terminate()
        process.wait(20)


def test_a_body_that_never_arrives_is_dropped(tiny_q4: Path, tmp_path: Path) -> None:
    process = _start(tiny_q4, tmp_path, "--quiet")
    try:
        url = _url_of(process)
        port = int(url.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Length: 100\r\n\r\n{")  # fmt: skip
        t0 = time.monotonic()
        s.settimeout(60)
        try:
            data = s.recv(1024)
        except OSError:
            data = b""
        took = time.monotonic() - t0
        s.close()
        assert data == b""  # closed, without a reply
        assert 25 < took < 50, took
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(20)
