"""Running `starling serve` in a subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

READY = re.compile(r"at http://[\d.]+:(\d+)/v1")


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    warnings: list[str]
    home: Path
    banner: str = ""

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


@contextmanager
def serve(model: Path, home: Path, *args: str, timeout: float = 60) -> Iterator[Served]:
    env = dict(os.environ, STARLING_HOME=str(home))
    env.pop("STARLING_API_KEY", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "starling_local",
            "serve",
            "--model",
            str(model),
            "--port",
            "0",
            *args,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    url = None
    banner = ""
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = READY.search(line)
        if found:
            banner = line
            url = f"http://127.0.0.1:{found.group(1)}"
            break
    try:
        assert url, f"the server did not start: {''.join(lines)}"
        assert httpx.get(f"{url}/health").status_code == 200
        warnings = [line for line in lines if "warning" in line]
        yield Served(url, process, warnings, home, banner)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
