"""Small modal screens: confirm, edit text, sampling settings, show the rendered prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Static, TextArea


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel", id="dialog.cancel")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(classes="dialog"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                yield Button("Delete", variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextScreen(ModalScreen[str | None]):
    """Edit one piece of text (a title, the system prompt, a message)."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel", id="dialog.cancel"),
        Binding("ctrl+s", "save", "Save", id="dialog.save"),
    ]

    def __init__(self, title: str, text: str, multiline: bool = False) -> None:
        super().__init__()
        self.title_text = title
        self.text = text
        self.multiline = multiline

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(classes="dialog"):
            yield Label(self.title_text)
            if self.multiline:
                yield TextArea(self.text, id="text", soft_wrap=True)
                yield Label("Ctrl+S saves, Escape cancels", classes="hint")
            else:
                yield Input(self.text, id="text")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        """The cursor at the end of the text: editing usually adds to it."""
        widget = self.query_one("#text")
        widget.focus()
        if isinstance(widget, TextArea):
            widget.move_cursor(widget.document.end)
        elif isinstance(widget, Input):
            widget.cursor_position = len(widget.value)

    def _value(self) -> str:
        widget = self.query_one("#text")
        return widget.text if isinstance(widget, TextArea) else widget.value  # type: ignore[attr-defined]

    def action_save(self) -> None:
        self.dismiss(self._value())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self._value() if event.button.id == "save" else None)


class SettingsScreen(ModalScreen[dict[str, Any] | None]):
    """Temperature, top-p, max tokens, seed."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="dialog.cancel")]
    FIELDS = (
        ("temperature", "Temperature (0 = greedy)", float),
        ("top_p", "Top-p", float),
        ("max_tokens", "Max tokens", int),
        ("seed", "Seed (empty = random)", int),
    )

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__()
        self.values = values

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(classes="dialog"):
            yield Label("Sampling settings")
            for key, label, _ in self.FIELDS:
                value = self.values.get(key)
                yield Label(label)
                yield Input("" if value is None else str(value), id=key)
            yield Label("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "save":
            self.dismiss(None)
            return
        out: dict[str, Any] = {}
        for key, label, kind in self.FIELDS:
            raw = self.query_one(f"#{key}", Input).value.strip()
            if raw == "" and key == "seed":
                out[key] = None
                continue
            try:
                out[key] = kind(raw)
            except ValueError:
                self.query_one("#error", Label).update(f"{label}: not a number")
                return
        if out["temperature"] < 0 or not 0 < out["top_p"] <= 1 or out["max_tokens"] < 1:
            self.query_one("#error", Label).update("temperature >= 0, 0 < top-p <= 1, max >= 1")
            return
        self.dismiss(out)


class PromptScreen(ModalScreen[None]):
    """The exact prompt the next reply would be generated from."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close", id="dialog.close")]

    def __init__(self, text: str, tokens: int, window: int, dropped: int) -> None:
        super().__init__()
        self.text = text
        self.tokens = tokens
        self.window = window
        self.dropped = dropped

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(classes="dialog wide"):
            note = f" ({self.dropped} oldest messages left out)" if self.dropped else ""
            yield Label(f"Rendered prompt: {self.tokens} tokens of {self.window}{note}")
            with VerticalScroll():
                yield Static(self.text, markup=False, id="prompt-text")
            yield Button("Close", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)


class FileScreen(ModalScreen[Path | None]):
    """Pick a file: from the tree, or by typing its path."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="dialog.cancel")]

    def __init__(self, title: str, root: Path) -> None:
        super().__init__()
        self.title_text = title
        self.root = root

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(classes="dialog files"):
            yield Label(self.title_text)
            yield Input(placeholder="a path, or pick below", id="path")
            yield DirectoryTree(self.root, id="tree")
            yield Label("Enter picks, Escape cancels", classes="hint")

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(Path(event.path))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(Path(event.value.strip()).expanduser())
