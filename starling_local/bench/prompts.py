"""The speculative-decoding benchmark's prompts: replies that repeat their input (code edits,
quotes, list continuation, reformatting) and open-ended ones that do not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from starling_local.errors import StarlingError

_CODE = """def compute_total(items, tax_rate):
    total = 0
    for item in items:
        price = item["price"] * item["quantity"]
        total = total + price
    total = total * (1 + tax_rate)
    return round(total, 2)
"""

_BUGGY = """def average(numbers):
    total = 0
    for n in numbers:
        total += n
    return total / len(numbers) + 1


def largest(numbers):
    best = numbers[0]
    for n in numbers:
        if n < best:
            best = n
    return best
"""

_CLASS = """class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        if self.items.get(name, 0) < count:
            raise ValueError("not enough " + name)
        self.items[name] -= count

    def total(self):
        return sum(self.items.values())
"""

_ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes. The mayor said that "
    '"the lanes will make the streets safer for everyone who rides to work." Several shop '
    "owners worried about losing parking spaces. One owner, Maria Lopez, said that "
    '"our customers need somewhere to leave their cars." The council voted five to two to '
    "build the lanes on Main Street first, and to review the results after one year."
)

_RECIPE = (
    "Preheat the oven to 180 degrees. Mix 200 grams of flour with 100 grams of sugar and a pinch "
    "of salt. Beat two eggs with 150 millilitres of milk and add them to the flour. Pour the "
    "batter into a greased tin and bake for 35 minutes, until a knife comes out clean."
)

_JSON = (
    '{"name": "Ada Lovelace", "born": 1815, "died": 1852, "fields": ["mathematics", '
    '"computing"], "known_for": "the first published algorithm for a machine"}'
)

_CSV = """name,age,city
Alice,34,Paris
Bob,27,London
Carol,45,Berlin
Dave,31,Madrid
"""

_LIST = """1. Open the settings menu.
2. Choose the network tab.
3. Turn on the wireless switch.
4. Select your network from the list.
"""

GROUNDED = [
    f"Rename the variable `total` to `subtotal` in this function. Reply with the whole "
    f"function.\n\n```python\n{_CODE}```",
    f"Add type hints to this function. Reply with the whole function.\n\n```python\n{_CODE}```",
    f"Fix the bugs in this code. Reply with the corrected code.\n\n```python\n{_BUGGY}```",
    f"Add a docstring to every method of this class. Reply with the whole class.\n\n"
    f"```python\n{_CLASS}```",
    f"Summarize this article in two sentences, quoting the mayor exactly.\n\n{_ARTICLE}",
    f"What did Maria Lopez say? Quote her exactly.\n\n{_ARTICLE}",
    f"Rewrite this recipe as a numbered list of steps.\n\n{_RECIPE}",
    f"Reformat this JSON with one key per line and an indent of two spaces.\n\n{_JSON}",
    f"Convert this CSV to a JSON list of objects.\n\n{_CSV}",
    f"Continue this list with three more steps, repeating the list from the start.\n\n{_LIST}",
    f"Repeat this text exactly, then translate it into simple English.\n\n{_RECIPE}",
    f"Convert this function to use a list comprehension with sum(). Reply with the whole "
    f"function.\n\n```python\n{_CODE}```",
]

OPEN = [
    "Write a short poem about the sea.",
    "Give me three ideas for a birthday party.",
    "Explain why the sky is blue.",
]


@dataclass(frozen=True)
class BenchPrompt:
    messages: tuple[dict[str, str], ...]
    grounded: bool

    @property
    def title(self) -> str:
        text = self.messages[-1]["content"].splitlines()[0]
        return text if len(text) <= 60 else text[:57] + "..."


def default_prompts() -> list[BenchPrompt]:
    return [
        BenchPrompt(({"role": "user", "content": text},), grounded)
        for texts, grounded in ((GROUNDED, True), (OPEN, False))
        for text in texts
    ]


class PromptFileError(StarlingError):
    """A `--prompts` file that is not a list of `{"messages": [...], "grounded": bool}`."""


def load_prompts(path: Path) -> list[BenchPrompt]:
    """A user's prompt set: a JSON list of `{"messages": [{"role", "content"}...],
    "grounded": true|false}`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"{path}: cannot read it: {exc}") from exc
    except ValueError as exc:
        raise PromptFileError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise PromptFileError(f"{path}: expected a non-empty JSON list of prompts")
    prompts = []
    for i, item in enumerate(data, 1):
        messages = item.get("messages") if isinstance(item, dict) else None
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise PromptFileError(
                f'{path}: prompt {i}: expected "messages", a list of {{"role", "content"}} '
                "(roles: system, user, assistant)"
            )
        grounded = item.get("grounded", True)
        if not isinstance(grounded, bool):
            raise PromptFileError(f'{path}: prompt {i}: "grounded" must be true or false')
        prompts.append(
            BenchPrompt(
                tuple({"role": m["role"], "content": m["content"]} for m in messages), grounded
            )
        )
    return prompts
