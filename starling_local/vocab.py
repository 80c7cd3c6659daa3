"""Starling's special tokens (the Mistral v1 vocabulary plus OpenChat's two added tokens).

Shared by every layer: the template, the engine's stop ids, the converter and the GGUF checks.
"""

from __future__ import annotations

from pathlib import Path

BOS_ID = 1
EOS_ID = 2
END_OF_TURN_ID = 32000
PAD_ID = 32001
BOS_TEXT = "<s>"
END_OF_TURN = "<|end_of_turn|>"
PAD = "<|pad_0|>"


def packaged_vocabulary() -> Path:
    """The vocabulary-only Starling GGUF shipped in the package (tokenizing with no model)."""
    return Path(__file__).resolve().parent / "data" / "starling-vocab.gguf"
