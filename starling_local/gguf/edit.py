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

from starling_local.files import atomic_output, require_free_space
from starling_local.gguf.header import encode_entry, read_header
from starling_local.gguf.info import check_magic

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


def fix_starling_gguf(src: Path, dst: Path) -> list[str]:
    """Write a copy of `src` with the known Starling defects corrected; return what changed."""
    from starling_local.gguf.info import OPENCHAT_TEMPLATE, GGUFError, check_runnable
    from starling_local.vocab import END_OF_TURN, END_OF_TURN_ID, PAD_ID

    info = check_runnable(src)
    if info.special_tokens.get(END_OF_TURN_ID, ("", ""))[0] != END_OF_TURN:
        raise GGUFError(f"{src}: token 32000 is not <|end_of_turn|>: not a Starling/OpenChat model")
    header = read_header(src)
    changes: dict[str, Any] = {}
    done = []
    if info.eos_id != END_OF_TURN_ID:
        changes["tokenizer.ggml.eos_token_id"] = END_OF_TURN_ID
        done.append(f"eos {info.eos_id} -> 32000")
    if info.eot_id != END_OF_TURN_ID:
        changes["tokenizer.ggml.eot_token_id"] = END_OF_TURN_ID
        done.append("eot -> 32000")
    if not info.template_ok:
        changes["tokenizer.chat_template"] = OPENCHAT_TEMPLATE
        done.append("chat template -> OpenChat 3.5")
    types = header.fields.get("tokenizer.ggml.token_type")
    if types is not None:
        fixed = list(types)
        for token_id in (END_OF_TURN_ID, PAD_ID):
            if token_id < len(fixed) and fixed[token_id] != 3:
                fixed[token_id] = 3
                done.append(f"token {token_id} -> CONTROL")
        if fixed != types:
            changes["tokenizer.ggml.token_type"] = fixed
    if not done:
        return []
    rewrite_metadata(src, dst, changes)
    return done
