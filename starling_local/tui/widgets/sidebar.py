"""Saved conversations, newest first, with full-text search."""

from __future__ import annotations

from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView


class ConversationItem(ListItem):
    def __init__(self, conversation_id: int, title: str, detail: str = "") -> None:
        super().__init__(
            Label(title or "(untitled)", classes="title", markup=False),
            # A search snippet marks the match as [word]: text, not Rich markup.
            Label(detail, classes="detail", markup=False),
        )
        self.conversation_id = conversation_id


class Sidebar(Vertical):
    """A search box over a list of conversations."""

    class Selected(Message):
        def __init__(self, conversation_id: int) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    class SearchChanged(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def compose(self):  # type: ignore[no-untyped-def]
        yield Input(placeholder="Search conversations", id="search")
        yield ListView(id="conversations")

    async def show(self, rows: list[tuple[int, str, str]], selected: int | None) -> None:
        """`(id, title, detail)` rows, highlighting `selected`."""
        view = self.query_one(ListView)
        await view.clear()
        items = [ConversationItem(cid, title, detail) for cid, title, detail in rows]
        await view.extend(items)
        for index, item in enumerate(items):
            if item.conversation_id == selected:
                view.index = index

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.SearchChanged(event.value))

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ConversationItem):
            self.post_message(self.Selected(event.item.conversation_id))
