"""The user's preferences (`config.json` in the config directory): small, read at start-up and
written atomically when changed."""

from __future__ import annotations

import json
import os
from typing import Any

from starling_local.paths import ensure, get_paths


def load_config() -> dict[str, Any]:
    """The saved preferences ({} when there are none or the file is unreadable)."""
    path = get_paths().config / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_config(**changes: Any) -> None:
    """Merge `changes` into the saved preferences."""
    folder = ensure(get_paths().config)
    data = {**load_config(), **changes}
    tmp = folder / f".config.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, folder / "config.json")
