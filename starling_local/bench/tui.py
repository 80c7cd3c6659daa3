"""The TUI measured headless (`App.run_test`): time to interactive, and whether streaming a long
reply keeps up with generation, for two shapes of text.

- `paragraph`: the model's own reply (a random-weight model writes one endless paragraph).
- `markdown`: ordinary Markdown (headings, paragraphs, lists, code blocks). A random-weight model
  never writes it, so the reply is replayed: every token is still evaluated and sampled by the
  model exactly as in generation, and then the script's token is taken instead (`Replay`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from starling_local.engine.runtime import Engine

SHAPES = ("paragraph", "markdown")

_TOPICS = ("caching", "parsing", "logging", "retries", "streaming", "testing", "packaging")


def markdown_document(sections: int = 40) -> str:
    """About 60 tokens of ordinary Markdown per section: a heading, paragraphs with inline code
    and emphasis, a list, and a fenced code block."""
    parts = []
    for i in range(sections):
        topic = _TOPICS[i % len(_TOPICS)]
        parts.append(f"## {i + 1}. {topic.title()}\n")
        parts.append(
            f"When you add **{topic}** to a service, start small: measure first, then change "
            f"one thing at a time. The `{topic}_enabled` flag keeps the old path available.\n"
        )
        if i % 2 == 0:
            parts.append(
                f"- keep the {topic} code in one module\n"
                f"- test it with real inputs, not mocks\n"
                f"- document the defaults in the README\n"
            )
        else:
            parts.append(
                f"```python\ndef {topic}_step(value: int) -> int:\n"
                f"    # one step of {topic}\n    return value * {i + 2}\n```\n"
            )
    return "\n".join(parts)


class Replay:
    """An engine's llama-cpp-python adapter whose `sample` evaluates and samples as usual, then
    answers with the script's next token (the reply then has the script's text)."""

    def __init__(self, adapter: Any, script: list[int]) -> None:
        self._adapter = adapter
        self._script = script
        self._next = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def sample(self, llm: Any, sampler: Any, index: int) -> int:
        self._adapter.sample(llm, sampler, index)  # the work of choosing a token
        token = self._script[self._next % len(self._script)]
        self._next += 1
        return token

    @classmethod
    def install(cls, engine: Engine, text: str) -> Replay:
        replay = cls(engine._adapter, engine.tokenize_text(text))
        engine._adapter = replay  # type: ignore[assignment]  # the module's duck type
        return replay


async def _measure(model: Path, tokens: int, db: Path, shape: str) -> dict[str, Any]:
    from starling_local.store.conversations import ConversationStore
    from starling_local.tui.app import StarlingApp
    from starling_local.tui.screens.chat import ChatScreen
    from starling_local.tui.widgets.prompt_input import PromptInput

    start = time.perf_counter()
    app = StarlingApp(model=str(model), store=ConversationStore(db), n_ctx=4096)
    figures: dict[str, Any] = {"shape": shape}
    async with app.run_test(size=(120, 40)) as pilot:
        while not (isinstance(app.screen, ChatScreen) and app.screen.query(PromptInput)):
            await pilot.pause(0.01)
        figures["interactive_s"] = time.perf_counter() - start
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        while not screen.model_ready:
            await pilot.pause(0.01)
        figures["model_loaded_s"] = time.perf_counter() - start
        if shape == "markdown":
            engine = app.service.engine
            assert isinstance(engine, Engine)
            Replay.install(engine, markdown_document())
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
        figures["redraws"] = screen.pacer.redraws
        shown = screen.chat.last("assistant")
        figures["rendered_chars"] = len(shown.markdown.source) if shown else 0
        figures["reply_chars"] = len(conv.messages[-1].content)
        figures["reply_head"] = conv.messages[-1].content[:40]
    return figures


def tui_figures(model: Path, tokens: int, db: Path, shape: str = "paragraph") -> dict[str, Any]:
    return asyncio.run(_measure(model, tokens, db, shape))
