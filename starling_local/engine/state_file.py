"""KV state files: llama.cpp's serialized cache behind a header of our own.

llama.cpp trusts the lengths inside its state data: a truncated file, or one written by another
llama.cpp, can abort the process (`GGML_ASSERT(nread <= state_size)`). So nothing reaches
llama.cpp until the header has been checked: format version, the llama-cpp-python version,
the model it was made with, the token count and the payload's length and CRC-32.

    b"STARLKV\\n" | u32 header length | header (JSON) | tokens (int32 LE) | llama.cpp state
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"STARLKV\n"
FORMAT = 1
_LENGTH = struct.Struct("<I")
MAX_HEADER = 1 << 16


class StateFileError(Exception):
    """The file is not a state file this engine can load (the message says why)."""


@dataclass(frozen=True)
class StateHeader:
    """What a state file says about itself."""

    format: int
    llama_cpp_python: str
    model: str
    token_count: int
    payload_bytes: int
    crc32: int

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()


def write_state_file(
    path: Path, *, model: str, version: str, tokens: list[int], payload: Any, size: int
) -> int:
    """Write `tokens` and `size` bytes of `payload` (a buffer) under a header, atomically (a
    temporary file renamed into place); return the bytes written."""
    token_bytes = array("i", tokens).tobytes()
    body = memoryview(payload).cast("B")[:size]
    crc = zlib.crc32(body, zlib.crc32(token_bytes))
    header = StateHeader(FORMAT, version, model, len(tokens), size, crc).to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    from starling_local.files import sweep_orphans

    sweep_orphans(path.parent)  # saves killed half-way, by processes now gone
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with tmp.open("wb") as fh:
            fh.write(MAGIC + _LENGTH.pack(len(header)) + header)
            fh.write(token_bytes)
            fh.write(body)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(MAGIC) + _LENGTH.size + len(header) + len(token_bytes) + size


def _header(fh: Any, model: str, version: str) -> StateHeader:
    head = fh.read(len(MAGIC) + _LENGTH.size)
    if len(head) < len(MAGIC) + _LENGTH.size or not head.startswith(MAGIC):
        raise StateFileError("not a starling-local state file")
    (length,) = _LENGTH.unpack(head[len(MAGIC) :])
    if length > MAX_HEADER:
        raise StateFileError("damaged header")
    try:
        header = StateHeader(**json.loads(fh.read(length)))
    except (ValueError, TypeError) as exc:
        raise StateFileError(f"damaged header ({exc})") from exc
    if header.format != FORMAT:
        raise StateFileError(f"state format {header.format}, this version reads {FORMAT}")
    if header.llama_cpp_python != version:
        raise StateFileError(
            f"made by llama-cpp-python {header.llama_cpp_python}, this is {version}"
        )
    if header.model != model:
        raise StateFileError("made with another model file")
    return header


def read_state_tokens(path: Path, *, model: str, version: str) -> list[int]:
    """The tokens a state file holds, read without its payload (a few KB of a file of tens
    of MB): enough to know whether loading it would help. `StateFileError` for a file that is
    not one this engine made, or whose length is not what its header says."""
    with path.open("rb") as fh:
        header = _header(fh, model, version)
        token_bytes = fh.read(4 * header.token_count)
        expected = fh.tell() + header.payload_bytes
    if len(token_bytes) != 4 * header.token_count or path.stat().st_size != expected:
        raise StateFileError("truncated or padded")
    return array("i", token_bytes).tolist()


def read_state_file(path: Path, *, model: str, version: str) -> tuple[list[int], bytearray]:
    """The tokens and llama.cpp payload of a state file made for `model` by llama-cpp-python
    `version`, whole and unchanged; `StateFileError` otherwise."""
    with path.open("rb") as fh:
        header = _header(fh, model, version)
        token_bytes = fh.read(4 * header.token_count)
        payload = bytearray(header.payload_bytes)
        got = fh.readinto(payload)
        extra = fh.read(1)
    if len(token_bytes) != 4 * header.token_count or got != header.payload_bytes or extra:
        raise StateFileError("truncated or padded")
    if zlib.crc32(payload, zlib.crc32(token_bytes)) != header.crc32:
        raise StateFileError("checksum mismatch")
    return array("i", token_bytes).tolist(), payload
