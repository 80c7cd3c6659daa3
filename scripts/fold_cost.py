"""UI-thread CPU per redraw of a streaming Markdown reply, folding off vs on (tui/widgets/fold.py).

python scripts/fold_cost.py [--history 0,20] [--chunk 170]

Headless, no model: the bench's 2,000-token Markdown document is streamed into the real chat
view in chunks of `--chunk` characters (what one redraw brings on a 2-core machine), each chunk
delivered as a message to the screen as the app does, below `--history` earlier Markdown
messages. Prints the CPU time per chunk (mean over the first and last quarter) both ways, in one
run; the ratio is the figure, the milliseconds depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from textual.app import App, ComposeResult
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownStream

from starling_local.bench.tui import markdown_document
from starling_local.tui.widgets.chat_view import ChatView, MessageView

CSS = Path(__file__).resolve().parents[1] / "starling_local" / "tui" / "starling.tcss"


class Chunk(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Stream(Screen[None]):
    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.fold = fold
        self.view: MessageView | None = None
        self.stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield ChatView(id="chat")

    async def on_chunk(self, message: Chunk) -> None:
        assert self.view is not None
        assert self.stream is not None
        await self.stream.write(message.text)
        if self.fold:
            self.call_after_refresh(self.query_one(ChatView).fold_above_view, self.view)


async def measure(fold: bool, history: int, chunk: int) -> tuple[float, float]:
    screen = Stream(fold)

    class Harness(App[None]):
        CSS_PATH = str(CSS)

        def on_mount(self) -> None:
            self.push_screen(screen)

    doc = markdown_document()
    app = Harness()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.2)
        chat = screen.query_one(ChatView)
        for i in range(history):
            await chat.add("user" if i % 2 == 0 else "assistant", markdown_document(4))
        await chat.add("user", "Write a long document.")
        screen.view = await chat.add("assistant", "")
        screen.stream = Markdown.get_stream(screen.view.markdown)
        await pilot.pause(0.2)
        costs = []
        for start in range(0, len(doc), chunk):
            before = time.thread_time()
            screen.post_message(Chunk(doc[start : start + chunk]))
            await asyncio.sleep(0.3)  # the redraw, and idle time as between real redraws
            costs.append(time.thread_time() - before)
        await screen.stream.stop()
    quarter = max(1, len(costs) // 4)
    return sum(costs[:quarter]) / quarter, sum(costs[-quarter:]) / quarter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", default="0,20", help="earlier messages, comma-separated")
    parser.add_argument("--chunk", type=int, default=170)
    args = parser.parse_args()
    print("history  folding  ms/redraw first quarter  last quarter")
    for history in (int(h) for h in args.history.split(",")):
        for fold in (False, True):
            first, last = asyncio.run(measure(fold, history, args.chunk))
            print(
                f"{history:>7}  {'on ' if fold else 'off'}      {first * 1000:>10.1f}"
                f"  {last * 1000:>12.1f}"
            )


if __name__ == "__main__":
    main()
