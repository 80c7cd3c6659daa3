"""The conversation: one Markdown block per message, in a scroll view anchored to the end."""

from __future__ import annotations

from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Markdown

#: Shown when there is no model to load.
NO_MODEL_HELP = """\
**No model yet.** In a terminal, run:

```
starling pull                            # Starling-LM-7B-alpha, Q4_K_M (4.4 GB)
starling pull starling-lm-7b-beta        # or the beta
```

then start `starling` again (or `starling chat --model PATH.gguf` for a file you already have).
"""
#: How a reply that ended early is labelled, by stop reason.
NOTES = {"cancelled": "stopped", "length": "max tokens reached", "error": "error"}


class MessageView(Vertical):
    """A message with a small header (who, and a note such as "stopped")."""

    def __init__(self, role: str, content: str, note: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.note = note

    def compose(self):  # type: ignore[no-untyped-def]
        who = {"user": "You", "assistant": "Starling", "notice": "starling-local"}[self.role]
        yield Label(f"{who}{'  · ' + self.note if self.note else ''}", classes="who")
        yield Markdown(self.content, classes="body")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def set_note(self, note: str) -> None:
        self.note = note
        who = "You" if self.role == "user" else "Starling"
        self.query_one(Label).update(f"{who}{'  · ' + note if note else ''}")


class ChatView(VerticalScroll):
    """All messages of the open conversation."""

    async def show(self, messages: list[tuple[str, str, str]]) -> None:
        """Replace the contents with `(role, content, note)` messages."""
        await self.remove_children()
        await self.mount_all([MessageView(role, content, note) for role, content, note in messages])
        self.scroll_end(animate=False)
        self.anchor()

    async def add(self, role: str, content: str, note: str = "") -> MessageView:
        view = MessageView(role, content, note)
        await self.mount(view)
        self.anchor()
        return view

    def last(self, role: str) -> MessageView | None:
        views = [v for v in self.query(MessageView) if v.role == role]
        return views[-1] if views else None
