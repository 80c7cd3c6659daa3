"""One line of facts: model, backend, mode, context used, speed."""

from __future__ import annotations

from textual.widgets import Static


class StatusBar(Static):
    def __init__(self) -> None:
        super().__init__("", id="status")
        self.model = "no model"
        self.backend = ""
        self.mode = "chat"
        self.context = ""
        self.speed = ""
        self.state = ""

    def refresh_text(self) -> None:
        parts = [self.model]
        if self.backend:
            parts.append(self.backend)
        parts.append(f"mode {self.mode}")
        if self.context:
            parts.append(self.context)
        if self.speed:
            parts.append(self.speed)
        if self.state:
            parts.append(self.state)
        self.update("  │  ".join(parts), layout=False)  # one line, always: no re-layout

    def set(self, **fields: str) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        self.refresh_text()
