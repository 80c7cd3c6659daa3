"""The conversation: one Markdown block per message, in a scroll view anchored to the end."""

from __future__ import annotations

from collections.abc import Sequence

from textual import events
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Label, Markdown
from textual.widgets.markdown import MarkdownBlock

from starling_local.tui.widgets.fold import fold_above, unfold

#: Shown when there is no model to load.
NO_MODEL_HELP = """\
**No model yet.** Download one here: the button below gets Starling-LM-7B-alpha, and **F5** lists
every model and quantization. Or, in a terminal:

```
starling pull                            # Starling-LM-7B-alpha, Q4_K_M (4.4 GB)
starling chat --model PATH.gguf          # a file you already have
```
"""
#: How a reply that ended early is labelled, by stop reason.
NOTES = {"cancelled": "stopped", "length": "max tokens reached", "error": "error"}


def hard_breaks(text: str) -> str:
    """A typed message as Markdown that keeps its line breaks (Markdown joins single newlines
    into one paragraph); code fences are left as they are."""
    lines, fenced = text.split("\n"), False
    for i, line in enumerate(lines[:-1]):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.strip():
            lines[i] = line + "  "  # Markdown's hard line break
    return "\n".join(lines)


class MessageView(Vertical, can_focus=True):
    """A message with a small header (who, and a note such as "stopped"). Focused (a click, or
    Ctrl+Up from the message box and Up/Down between messages), its keys act on it."""

    BINDINGS = [
        Binding("c", "act('copy')", "Copy", id="message.copy"),
        Binding("b", "act('branch')", "Branch from here", id="message.branch"),
        Binding("d", "act('delete')", "Delete pair", id="message.delete"),
        *(
            Binding(str(n), f"act('code {n}')", f"Copy code block {n}", show=False)
            for n in range(1, 10)
        ),
        Binding("escape", "leave", "Back to typing", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
        Binding("down", "move(1)", "Next", show=False),
    ]

    class Action(Message):
        """`action` ("copy", "branch", "delete", "code N") asked of message `view`."""

        def __init__(self, view: MessageView, action: str) -> None:
            super().__init__()
            self.view = view
            self.action = action

    def __init__(
        self, role: str, content: str, note: str = "", message_id: int | None = None
    ) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.note = note
        self.message_id = message_id

    def action_act(self, action: str) -> None:
        self.post_message(self.Action(self, action))

    def action_leave(self) -> None:
        self.screen.query_one("#input").focus()

    def action_move(self, step: int) -> None:
        views = list(self.screen.query(MessageView))
        index = views.index(self) + step
        if 0 <= index < len(views):
            views[index].focus()
            views[index].scroll_visible()

    def compose(self):  # type: ignore[no-untyped-def]
        who = {"user": "You", "assistant": "Starling", "notice": "starling-local"}[self.role]
        yield Label(f"{who}{'  · ' + self.note if self.note else ''}", classes="who")
        text = hard_breaks(self.content) if self.role == "user" else self.content
        yield Markdown(text, classes="body")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def set_note(self, note: str) -> None:
        self.note = note
        who = "You" if self.role == "user" else "Starling"
        self.query_one(Label).update(f"{who}{'  · ' + note if note else ''}")


class ChatView(VerticalScroll):
    """All messages of the open conversation."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._folded: set[Widget] = set()  # containers with a Fold (widgets/fold.py)
        self._folded_width = 0

    def fold_above_view(self, streaming: MessageView) -> None:
        """While the view follows the `streaming` reply to its end, hide the messages and the
        reply's finished Markdown blocks that have scrolled out of view above it."""
        if not self.is_vertical_scroll_end or not streaming.is_attached:
            return
        top = self.content_region.y
        self._folded_width = self.size.width
        views = list(self.query_children(MessageView))
        if streaming in views and fold_above(self, views[: views.index(streaming) + 1], top):
            self._folded.add(self)
        markdown = streaming.markdown
        blocks = [b for b in markdown.children if isinstance(b, MarkdownBlock)]
        if fold_above(markdown, blocks, top):
            self._folded.add(markdown)

    def unfold(self) -> None:
        """Show everything `fold_above_view` hid."""
        for container in self._folded:
            if container.is_attached:
                unfold(container)
        self._folded.clear()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self._folded and new_value < self.max_scroll_y:  # the user scrolls up
            self.unfold()

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        self.unfold()  # a message is being selected: all of them are there to move to

    def on_resize(self, event: events.Resize) -> None:
        if self._folded and event.size.width != self._folded_width:
            self.unfold()  # what is folded would wrap to another height now

    async def show(self, messages: Sequence[tuple[str, str, str, int | None]]) -> None:
        """Replace the contents with `(role, content, note, message id)` messages."""
        self._folded.clear()
        await self.remove_children()
        await self.mount_all([MessageView(*message) for message in messages])
        self.scroll_end(animate=False)
        self.anchor()

    async def add(
        self, role: str, content: str, note: str = "", message_id: int | None = None
    ) -> MessageView:
        view = MessageView(role, content, note, message_id)
        await self.mount(view)
        self.anchor()
        return view

    def last(self, role: str) -> MessageView | None:
        views = [v for v in self.query(MessageView) if v.role == role]
        return views[-1] if views else None
