"""Turning what the user typed after `--model` into a GGUF file on disk."""

from __future__ import annotations

from pathlib import Path

from starling_local.errors import UsageError


def resolve_model_spec(spec: str | None) -> Path:
    """A model path (or, once pulled, a model name) -> an existing GGUF path."""
    if not spec:
        raise UsageError(
            "no model given: pass --model PATH.gguf (or set STARLING_MODEL); "
            "`starling convert` makes one from a checkpoint"
        )
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise UsageError(f"no such model: {spec}")
