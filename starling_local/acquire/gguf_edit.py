"""Rewriting a GGUF's metadata without touching its tensors.

Unchanged entries and the tensor table are copied byte for byte, the tensor data is streamed
across, and the result is renamed into place only when complete.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from starling_local.acquire.files import atomic_output, require_free_space
from starling_local.acquire.gguf_file import check_magic
from starling_local.acquire.gguf_header import encode_entry, read_header

#: Value types for keys that a fix may add to a file that lacks them.
NEW_KEY_TYPES = {
    "tokenizer.ggml.eos_token_id": 4,
    "tokenizer.ggml.eot_token_id": 4,
    "tokenizer.chat_template": 8,
    "tokenizer.ggml.token_type": 9,
}


def rewrite_metadata(
    src: Path, dst: Path, changes: Mapping[str, Any], remove: Iterable[str] = ()
) -> Path:
    """Copy `src` to `dst` with metadata `changes` applied and the keys in `remove` dropped."""
    check_magic(src)
    header = read_header(src)
    removed = set(remove)
    require_free_space(dst.parent, src.stat().st_size, dst.name)
    with src.open("rb") as fin:
        entries: list[bytes] = []
        for key, (start, end) in header.spans.items():
            if key in removed:
                continue
            if key in changes:
                entries.append(encode_entry(key, changes[key], header.value_types[key]))
            else:
                fin.seek(start)
                entries.append(fin.read(end - start))
        for key, value in changes.items():
            if key not in header.spans and key not in removed:
                entries.append(encode_entry(key, value, NEW_KEY_TYPES.get(key, 8)))
        fin.seek(header.fields_end)
        tensor_table = fin.read(header.tensors_end - header.fields_end)
        with atomic_output(dst) as tmp, tmp.open("wb") as fout:
            fout.write(
                b"GGUF" + struct.pack("<IQQ", header.version, len(header.tensors), len(entries))
            )
            for entry in entries:
                fout.write(entry)
            fout.write(tensor_table)
            fout.write(b"\0" * (-fout.tell() % header.alignment))
            fin.seek(header.data_offset)
            shutil.copyfileobj(fin, fout, 16 << 20)
    return dst
