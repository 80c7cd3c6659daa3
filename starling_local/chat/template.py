"""The OpenChat 3.5 prompt template that Starling-LM-7B was trained on, token-exact.

A prompt is built as *segments*: plain text, which is tokenized as text (so a user who types
`<|end_of_turn|>` gets the characters, never the control token), and special token ids.
Tokenizing each text segment separately is exactly what the reference tokenizer does, because
special tokens split the text and sentencepiece adds its dummy-prefix space after each one:

    GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:
    -> [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, ... 21631, 28747]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from starling_local.vocab import BOS_ID, BOS_TEXT, END_OF_TURN, END_OF_TURN_ID, EOS_ID, PAD_ID

__all__ = ["BOS_ID", "END_OF_TURN", "END_OF_TURN_ID", "EOS_ID", "PAD_ID"]

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

#: A piece of a prompt: text to tokenize as plain text, or a special token id.
Segment = str | int
Tokenize = Callable[[str], list[int]]


class Mode(str, Enum):
    """Which OpenChat persona the turns use."""

    CHAT = "chat"
    CODE = "code"

    @property
    def prefix(self) -> str:
        return "GPT4 Correct" if self is Mode.CHAT else "Code"


class SystemPolicy(str, Enum):
    """Where a system prompt goes.

    `native` is what OpenChat's training code and llama.cpp's built-in openchat template do:
    the bare text right after BOS, then `<|end_of_turn|>`. `hub` follows the Hub's Jinja
    template: `GPT4 Correct System: {text}<|end_of_turn|>`.
    """

    NATIVE = "native"
    HUB = "hub"


@dataclass(frozen=True)
class Message:
    """One turn of a conversation.

    `tokens` are the ids a reply was generated as (without the end-of-turn id). When present,
    the reply re-enters the prompt as exactly those ids, so the KV cache of the turn that produced
    it is reused to the last token even where the model's tokenization differs from the
    canonical tokenization of its text.
    """

    role: Role
    content: str
    tokens: tuple[int, ...] | None = None


def role_label(mode: Mode, role: Role) -> str:
    """`GPT4 Correct User`, `Code Assistant`, ..."""
    return f"{mode.prefix} {role.title()}"


def message_segments(
    message: Message, mode: Mode, exact: bool = True, *, closed: bool = True
) -> list[Segment]:
    """`{Label}: {content}<|end_of_turn|>` as segments.

    Content is stripped of surrounding whitespace: a reply is generated after `Assistant:` and
    starts with the dummy-prefix space, and stdin input ends with a newline; neither belongs in
    the re-rendered turn. With `exact`, a reply's generated ids are used as they are.
    `closed=False` leaves the turn open (no `<|end_of_turn|>`): a reply to continue.
    """
    label = role_label(mode, message.role)
    end = [END_OF_TURN_ID] if closed else []
    if exact and message.tokens and message.role == "assistant":
        return [f"{label}:", *message.tokens, *end]
    content = message.content.strip() if closed else message.content.rstrip()
    return [f"{label}: {content.lstrip()}" if content else f"{label}:", *end]


def system_segments(system: str, mode: Mode, policy: SystemPolicy) -> list[Segment]:
    """The system prompt's segments, or none when it is empty."""
    text = system.strip()
    if not text:
        return []
    if policy is SystemPolicy.HUB:
        return message_segments(Message("system", text), mode)
    return [text, END_OF_TURN_ID]


def generation_prompt(mode: Mode) -> list[Segment]:
    """`GPT4 Correct Assistant:` with no trailing space: the model writes the space itself."""
    return [f"{role_label(mode, 'assistant')}:"]


def render_segments(
    messages: Sequence[Message],
    *,
    mode: Mode = Mode.CHAT,
    system: str = "",
    policy: SystemPolicy = SystemPolicy.NATIVE,
    add_generation_prompt: bool = True,
    exact: bool = True,
    continue_last: bool = False,
) -> list[Segment]:
    """The whole prompt as segments, starting with the one BOS (`exact=False` for text).
    `continue_last`: the last message is a reply to continue, left open (no end of turn, no
    generation prompt)."""
    segments: list[Segment] = [BOS_ID]
    segments += system_segments(system, mode, policy)
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message.role == "system":
            # A system message inside the list is treated like the system prompt.
            segments += system_segments(message.content, mode, policy)
        else:
            closed = not (continue_last and i == last and message.role == "assistant")
            segments += message_segments(message, mode, exact, closed=closed)
    if add_generation_prompt and not continue_last:
        segments += generation_prompt(mode)
    return segments


_SPECIAL_TEXT = {BOS_ID: BOS_TEXT, END_OF_TURN_ID: END_OF_TURN}


def segments_to_text(segments: Sequence[Segment]) -> str:
    """The prompt as text, special tokens written as their pieces (`<s>`, `<|end_of_turn|>`)."""
    return "".join(s if isinstance(s, str) else _SPECIAL_TEXT.get(s, f"<{s}>") for s in segments)


def segments_to_tokens(segments: Sequence[Segment], tokenize: Tokenize) -> list[int]:
    """Token ids: text segments through `tokenize` (plain text, no BOS), ids as they are."""
    tokens: list[int] = []
    for segment in segments:
        if isinstance(segment, int):
            tokens.append(segment)
        elif segment:
            tokens += tokenize(segment)
    return tokens


@dataclass(frozen=True)
class PromptStyle:
    """How a conversation is rendered: persona mode and system-prompt placement."""

    mode: Mode = Mode.CHAT
    policy: SystemPolicy = SystemPolicy.NATIVE


DEFAULT_STYLE = PromptStyle()


def _continues(messages: Sequence[Message]) -> bool:
    return bool(messages) and messages[-1].role == "assistant"


def render_text(
    messages: Sequence[Message], system: str = "", style: PromptStyle = DEFAULT_STYLE
) -> str:
    """Render a conversation to the exact prompt text of its next reply (one that ends with a
    reply is left open: the reply continues it), special tokens written as their pieces."""
    return segments_to_text(
        render_segments(
            messages,
            mode=style.mode,
            system=system,
            policy=style.policy,
            exact=False,
            continue_last=_continues(messages),
        )
    )


def render_tokens(
    messages: Sequence[Message],
    tokenize: Tokenize,
    system: str = "",
    style: PromptStyle = DEFAULT_STYLE,
) -> list[int]:
    """Render a conversation to the exact prompt token ids of its next reply (one that ends
    with a reply is left open: the reply continues it)."""
    return segments_to_tokens(
        render_segments(
            messages,
            mode=style.mode,
            system=system,
            policy=style.policy,
            continue_last=_continues(messages),
        ),
        tokenize,
    )
