"""Stop strings in a streamed reply: text is held back while it could be the start of one, so a
stop string never reaches the client, even split across chunks."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed chunks; get the text that is safe to show. `stopped` once a stop string appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.text = ""
        """Everything shown so far."""
        self.stopped = False

    def feed(self, chunk: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            self.text += chunk
            return chunk
        buffer = self._held + chunk
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return self._show(buffer[:cut])
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return self._show(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """The end of the stream: what was held back is text after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else self._show(held)

    def _show(self, text: str) -> str:
        self.text += text
        return text
