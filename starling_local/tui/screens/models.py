"""The models screen: the catalog and the local library; download (resumable, verified), use,
make default, delete, without leaving the app."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from textual import work
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, ProgressBar

from starling_local.errors import StarlingError
from starling_local.tui.screens.dialogs import ConfirmScreen

DEFAULT_DOWNLOAD = "starling-lm-7b-alpha:Q4_K_M"


def download_offer() -> str:
    """The label of the first-run download button: what, how big, and the free disk."""
    from starling_local.acquire.catalog import parse_model_ref
    from starling_local.files import free_bytes, human_bytes
    from starling_local.paths import get_paths

    ref = parse_model_ref(DEFAULT_DOWNLOAD)
    size = human_bytes(ref.model.gguf.sizes[ref.quant])
    free = human_bytes(free_bytes(get_paths().data))
    return f"Download Starling-LM-7B-alpha {ref.quant} ({size}; {free} free)"


class DownloadCancelledError(StarlingError):
    """The user cancelled the download (what was fetched is kept for the next try)."""


@dataclass
class Row:
    name: str
    size: int
    status: str
    path: str | None


def model_rows() -> list[Row]:
    """Every catalog quant and every library model, with whether it is here and verified."""
    from starling_local.acquire.catalog import CATALOG
    from starling_local.acquire.library import ModelLibrary

    library = ModelLibrary()
    entries = {e.name: e for e in library.entries() if e.exists}
    default = library.default_name()
    rows = []
    for model in CATALOG.values():
        for quant, size in model.gguf.sizes.items():
            name = f"{model.name}:{quant}"
            entry = entries.pop(name, None)
            rows.append(Row(name, size, _status(entry, default), entry.path if entry else None))
    for entry in entries.values():
        rows.append(Row(entry.name, entry.size, _status(entry, default), entry.path))
    return rows


def _status(entry: Any, default: str | None) -> str:
    if entry is None:
        return "—"
    status = "downloaded, verified" if entry.verified else "here"
    return status + (", default" if entry.name == default else "")


class ModelsScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="models.back"),
        Binding("enter", "download", "Download", id="models.download"),
        Binding("u", "use", "Use now", id="models.use"),
        Binding("s", "set_default", "Make default", id="models.default"),
        Binding("x", "remove", "Delete", id="models.delete"),
        Binding("c", "cancel", "Cancel download", id="models.cancel"),
    ]

    class Progress(Message):
        def __init__(self, done: int, total: int) -> None:
            super().__init__()
            self.done = done
            self.total = total

    class Finished(Message):
        def __init__(self, name: str | None, error: str | None = None) -> None:
            super().__init__()
            self.name = name
            self.error = error

    def __init__(self, download: str | None = None) -> None:
        super().__init__()
        self.pending_download = download
        self.cancel = threading.Event()
        self.downloading: str | None = None
        self._started = 0.0

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(id="models"):
            yield Label("Models: Enter downloads, u uses now, s makes default, x deletes")
            yield DataTable(id="model-table", cursor_type="row")
            yield ProgressBar(id="download-bar", show_eta=False)
            yield Label("", id="download-status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("model", "size", "status")
        self.refresh_rows()
        self.query_one(ProgressBar).display = False
        table.focus()
        if self.pending_download:
            self.start_download(self.pending_download)

    def refresh_rows(self) -> None:
        from starling_local.files import free_bytes, human_bytes
        from starling_local.paths import get_paths

        table = self.query_one(DataTable)
        keep = self.selected()
        table.clear()
        rows = model_rows()
        for row in rows:
            table.add_row(row.name, human_bytes(row.size), row.status, key=row.name)
        names = [row.name for row in rows]
        if keep in names:  # the cursor stays on the model it was on
            table.move_cursor(row=names.index(keep))
        free = human_bytes(free_bytes(get_paths().data))
        if not self.downloading:
            self.query_one("#download-status", Label).update(f"{free} free on disk")

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    # --- download ------------------------------------------------------------------------------

    def action_download(self) -> None:
        name = self.selected()
        if name:
            self.start_download(name)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()  # Enter on a row (the table takes the key before the screen's binding)
        self.action_download()

    def start_download(self, name: str) -> None:
        if self.downloading:
            self.notify(f"Already downloading {self.downloading} (c cancels).")
            return
        self.downloading = name
        self.cancel.clear()
        self._started = time.monotonic()
        bar = self.query_one(ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.query_one("#download-status", Label).update(f"Downloading {name}…")
        self.download(name)

    @work(thread=True, exclusive=True, group="download")
    def download(self, name: str) -> None:
        from starling_local.acquire.pull import pull

        screen = self

        class Bar:
            def __call__(self, done: int, total: int, detail: str = "", /) -> None:
                if screen.cancel.is_set():
                    raise DownloadCancelledError("cancelled; the next try resumes where it stopped")
                screen.post_message(ModelsScreen.Progress(done, total))

            def close(self, message: str = "") -> None:
                return None

        try:
            entry = pull(name, progress_factory=lambda label: Bar())
        except StarlingError as exc:
            self.post_message(self.Finished(None, str(exc)))
            return
        self.post_message(self.Finished(entry.name))

    def on_models_screen_progress(self, message: Progress) -> None:
        from starling_local.files import human_bytes

        bar = self.query_one(ProgressBar)
        bar.update(total=message.total or None, progress=message.done)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = message.done / elapsed
        eta = (message.total - message.done) / rate if rate and message.total else 0
        self.query_one("#download-status", Label).update(
            f"Downloading {self.downloading}: {human_bytes(message.done)} of "
            f"{human_bytes(message.total)}, {human_bytes(rate)}/s, about {eta:.0f} s left"
        )

    def on_models_screen_finished(self, message: Finished) -> None:
        self.downloading = None
        self.query_one(ProgressBar).display = False
        self.refresh_rows()
        if message.error:
            self.notify(message.error, severity="error")
        else:
            self.notify(f"{message.name} is downloaded and verified; u uses it now.")
            self.app.model_downloaded(message.name)  # type: ignore[attr-defined]

    def action_cancel(self) -> None:
        if self.downloading:
            self.cancel.set()

    # --- library -------------------------------------------------------------------------------

    def _library_entry(self) -> str | None:
        name = self.selected()
        here = {r.name for r in model_rows() if r.path}
        if name not in here:
            self.notify("Download it first (Enter).")
            return None
        return name

    def action_use(self) -> None:
        name = self._library_entry()
        if name:
            self.app.switch_model(name)  # type: ignore[attr-defined]
            self.app.pop_screen()

    def action_set_default(self) -> None:
        from starling_local.acquire.library import ModelLibrary

        name = self._library_entry()
        if name:
            ModelLibrary().set_default(name)
            self.refresh_rows()
            self.notify(f"{name} is the default model.")

    def action_remove(self) -> None:
        from starling_local.acquire.library import ModelLibrary

        name = self._library_entry()
        if name is None:
            return

        entry = ModelLibrary().find(name)
        owned = entry is None or entry.owned

        def done(yes: bool | None) -> None:
            if yes:
                ModelLibrary().remove(name)
                self.refresh_rows()
                self.notify(f"Deleted {name}." if owned else f"Removed {name}; the file stays.")

        question = (
            f"Delete {name} from disk?"
            if owned
            else f"Remove {name} from the library? Your file stays where it is."
        )
        self.app.push_screen(ConfirmScreen(question), done)
