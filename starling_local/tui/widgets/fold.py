"""Folding what has scrolled out of view while a reply streams.

Every layout of a Textual screen places every displayed widget, on screen or not, and a long
Markdown reply is hundreds of widgets (a list item is four). So each redraw of a streaming reply
cost more as the reply and the conversation grew. While the view follows the reply, the widgets
wholly above it are hidden and one `Fold` of the same height stands in for them: the scroll
position and the scrollbar stay where they were, and a layout costs what the visible part costs.
Everything is shown again as soon as the user scrolls or selects a message, or the reply ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.widget import Widget

#: Fold only when at least this many widgets would be hidden (each fold is a layout).
MIN_FOLD = 4


class Fold(Widget):
    """Blank space as tall as the widgets it stands in for."""

    DEFAULT_CSS = "Fold { height: 0; margin: 0; padding: 0; border: none; }"

    def __init__(self) -> None:
        super().__init__()
        self.hidden: list[Widget] = []


def fold_above(container: Widget, candidates: Sequence[Widget], top: int) -> int:
    """Hide the leading `candidates` (children of `container`, in order) whose screen region
    ends above the screen row `top`, growing the `Fold` at the container's start to their
    height. The last candidate is never hidden. Returns how many were hidden."""
    shown = [w for w in candidates if w.display]
    above = 0
    for widget in shown[:-1]:
        if widget.region.bottom + widget.styles.margin.bottom > top:
            break
        above += 1
    if above < MIN_FOLD:
        return 0
    below = shown[above]
    height = below.virtual_region.y - below.styles.margin.top
    if height <= 0:  # not laid out yet
        return 0
    fold = _fold_of(container)
    if fold is None:
        fold = Fold()
        container.mount(fold, before=0)
    fold.styles.height = height
    for widget in shown[:above]:
        widget.display = False
    fold.hidden.extend(shown[:above])
    return above


def unfold(container: Widget) -> bool:
    """Show what `fold_above` hid in `container`; False if nothing was folded."""
    fold = _fold_of(container)
    if fold is None:
        return False
    for widget in fold.hidden:
        widget.display = True
    fold.remove()
    return True


def _fold_of(container: Widget) -> Fold | None:
    first = container.children[0] if container.children else None
    return first if isinstance(first, Fold) else None
