"""Progress reporting: the one `Progress` protocol, and a terminal progress line on stderr.

Long jobs (downloads, conversion, quantization) take a `Progress` callable; front ends pass a
`ProgressFactory` that makes one per step (a terminal line here, a Textual bar in the app).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

from starling_local.files import human_bytes


class Progress(Protocol):
    """Told how far a job is: `done` of `total` units (bytes), with a short detail."""

    def __call__(self, done: int, total: int, detail: str = "", /) -> None: ...


class ProgressBar(Progress, Protocol):
    """A `Progress` shown somewhere, which is closed when its step ends."""

    def close(self, message: str = "") -> None: ...


#: Makes the bar of one step from its label (`"Downloading x.gguf"`).
ProgressFactory = Callable[[str], ProgressBar]


@contextlib.contextmanager
def progress_bar(factory: ProgressFactory | None, label: str) -> Iterator[ProgressBar | None]:
    """A bar for one step (or None without a factory), closed when the step ends."""
    bar = factory(label) if factory is not None else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """`label  45% [#########-----------] 1.2 GiB / 2.6 GiB  120 MiB/s  ETA 0:00:12  detail`
    on stderr (nothing at all when stderr is not a terminal)."""

    def __init__(
        self, label: str, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        if total > 0:
            frac = min(1.0, done / total)
            bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
            eta = _clock((total - done) / rate) if rate > 0 else "?"
            text = (
                f"{self.label} {frac:4.0%} [{bar}] {human_bytes(done)} / {human_bytes(total)}"
                f"  {human_bytes(rate)}/s  ETA {eta}"
            )
        else:
            text = f"{self.label} {human_bytes(done)}  {human_bytes(rate)}/s  {_clock(elapsed)}"
        if detail:
            text += f"  {detail[:30]}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = True

    def close(self, message: str = "") -> None:
        """End the line; print `message` (on a terminal) in its place."""
        if not self.enabled:
            return
        if self.shown:
            self.stream.write("\r\x1b[K")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
