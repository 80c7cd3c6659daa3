"""The TUI measured headless (`App.run_test`): time to interactive, and whether streaming a long
reply keeps up with generation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any


async def _measure(model: Path, tokens: int, db: Path) -> dict[str, Any]:
    from starling_local.store.conversations import ConversationStore
    from starling_local.tui.app import StarlingApp
    from starling_local.tui.screens.chat import ChatScreen
    from starling_local.tui.widgets.prompt_input import PromptInput

    start = time.perf_counter()
    app = StarlingApp(model=str(model), store=ConversationStore(db), n_ctx=4096)
    figures: dict[str, Any] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        while not (isinstance(app.screen, ChatScreen) and app.screen.query(PromptInput)):
            await pilot.pause(0.01)
        figures["interactive_s"] = time.perf_counter() - start
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        while not screen.model_ready:
            await pilot.pause(0.01)
        figures["model_loaded_s"] = time.perf_counter() - start
        screen.reply_overrides = {"temperature": 0.0, "max_tokens": tokens, "ignore_eos": True}
        screen.render_lag_s = None
        screen.query_one(PromptInput).text = "Write a very long story about a llama."
        await pilot.press("enter")
        while screen.render_lag_s is None:
            await asyncio.sleep(0.2)  # poll rarely: the app, not this loop, should use the CPU
        store = app.service.store
        conv = store.get(store.conversations()[0].id)
        stats = conv.messages[-1].stats or {}
        figures["reply_tokens"] = stats.get("completion_tokens")
        figures["tui_decode_tokens_per_s"] = stats.get("decode_tokens_per_s")
        figures["render_lag_s"] = screen.render_lag_s
        shown = screen.chat.last("assistant")
        figures["rendered_chars"] = len(shown.markdown.source) if shown else 0
        figures["reply_chars"] = len(conv.messages[-1].content)
    return figures


def tui_figures(model: Path, tokens: int, db: Path) -> dict[str, Any]:
    return asyncio.run(_measure(model, tokens, db))
