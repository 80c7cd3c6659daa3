"""`starling serve` measured from a client: streamed decode through HTTP against the `ask` path,
and two clients alternating between two conversations (tokens evaluated per turn)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

READY = re.compile(r"at http://[\d.]+:(\d+)/v1")


@contextmanager
def running_server(model: Path, home: Path, *args: str) -> Iterator[str]:
    """`starling serve` on a free loopback port; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "starling_local", "serve", "--model", str(model), "--port=0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, STARLING_HOME=str(home)),
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:
            found = READY.search(line)
            if found:
                yield f"http://127.0.0.1:{found.group(1)}"
                return
        raise RuntimeError("starling serve did not start")
    finally:
        process.terminate()
        process.wait(30)


def http_decode(url: str, tokens: int) -> float:
    """Tokens/s after the first one, as a streaming client sees them arrive."""
    import httpx2 as httpx

    body = {
        "messages": [{"role": "user", "content": "Write a long story about a llama."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    count = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("usage") and not event["choices"]:
                count = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
    return (count - 1) / (last - first) if last > first else 0.0


def alternating(url: str, turns: int = 5, reply_tokens: int = 16) -> list[dict[str, Any]]:
    """Clients A and B take turns, each sending its whole conversation every time."""
    import httpx2 as httpx

    history: dict[str, list[dict[str, str]]] = {"A": [], "B": []}
    rows = []
    for turn in range(turns):
        for who in "AB":
            topic = "rivers" if who == "A" else "mountains"
            history[who].append(
                {"role": "user", "content": f"Turn {turn}: tell me more about {topic}. " * 4}
            )
            body = {"messages": history[who], "max_tokens": reply_tokens, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
            usage = r["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            history[who].append(r["choices"][0]["message"])
            rows.append(
                {
                    "client": who,
                    "turn": turn + 1,
                    "prompt_tokens": usage["prompt_tokens"],
                    "evaluated": usage["prompt_tokens"] - cached,
                }
            )
    return rows


def serve_figures(model: Path, ask_tokens_per_s: Any, tokens: int = 256) -> dict[str, Any]:
    """Paired rounds: `ask_tokens_per_s()` (in this process) against HTTP streaming."""
    import tempfile

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(model, Path(tmp), "--ctx", "4096") as url,
    ):
        http_decode(url, 16)  # warm
        ratios, http, ask = [], [], []
        for _ in range(3):
            ask.append(ask_tokens_per_s(tokens))
            http.append(http_decode(url, tokens))
            ratios.append(http[-1] / ask[-1])
        turns = alternating(url)
    return {
        "tokens": tokens,
        "http_tokens_per_s": max(http),
        "ask_tokens_per_s": max(ask),
        "ratio": sorted(ratios)[1],
        "alternating": turns,
    }
