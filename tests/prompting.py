"""Engine-level tests: the engine's stream for the prompt a reply would get.

Replies themselves (recorded, resumed from a KV state file, continued) go through
`ConversationService` in the tests as in the product; these helpers are for tests of the
engine (its threads, cancelling, sampling, the KV cache it keeps between calls).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from starling_local.chat.context import FittedPrompt
from starling_local.chat.prompts import fit_messages
from starling_local.chat.settings import ConversationSettings
from starling_local.chat.template import Message
from starling_local.engine.interface import EngineLike
from starling_local.engine.types import EngineStream, SamplingParams


@dataclass
class Generated:
    stream: EngineStream
    prompt: FittedPrompt


def generate(
    engine: EngineLike,
    messages: Sequence[Message],
    *,
    params: SamplingParams | None = None,
    cancel: threading.Event | None = None,
    system: str = "",
) -> Generated:
    """Fit `messages` as the service does and start the engine on them."""
    params = params or SamplingParams()
    prompt = fit_messages(engine, messages, ConversationSettings(system=system, sampling=params))
    return Generated(engine.generate(prompt.tokens, params, cancel), prompt)
