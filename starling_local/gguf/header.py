"""A fast, dependency-free reader of a GGUF file's header (metadata and tensor table).

The `gguf` package's reader takes seconds on a 32k-token vocabulary and its import alone half a
second; checking a file before every load must cost milliseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: ggml type id -> (elements per block, bytes per block)
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 40),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
}
GGML_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    20: "IQ4_NL",
    23: "IQ4_XS",
    30: "BF16",
}

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
#: Arrays whose contents are kept; others are skipped (merges, scores).
KEEP_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"})
MAX_COUNT = 1 << 31


class HeaderError(ValueError):
    """The bytes are not a well-formed GGUF header."""


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        block, size = GGML_TYPE_SIZES.get(self.ggml_type, (1, 0))
        return self.n_elements * size // block


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorEntry] = field(default_factory=list)
    data_offset: int = 0
    fields_end: int = 0  # where the tensor table starts
    tensors_end: int = 0  # where the tensor table ends (before alignment padding)
    alignment: int = 32
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    """key -> (start, end) byte offsets of its whole key/value entry."""
    value_types: dict[str, int] = field(default_factory=dict)


class _Reader:
    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise HeaderError("unexpected end of file inside the header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > MAX_COUNT:
            raise HeaderError("string length out of range")
        return self.take(n).decode("utf-8", "replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        if n > MAX_COUNT:
            raise HeaderError("string length out of range")
        self.fh.seek(n, 1)

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.unpack("<I")
            count = self.unpack("<Q")
            if count > MAX_COUNT:
                raise HeaderError(f"{key}: array length out of range")
            keep = key in KEEP_ARRAYS
            if itype == _STRING:
                if keep:
                    return [self.string() for _ in range(count)]
                for _ in range(count):
                    self.skip_string()
                return None
            if itype not in _SCALARS:
                raise HeaderError(f"{key}: unsupported array type {itype}")
            fmt = _SCALARS[itype]
            width = struct.calcsize(fmt)
            if not keep:
                self.fh.seek(count * width, 1)
                return None
            raw = self.take(count * width)
            return list(struct.unpack(f"<{count}{fmt[1:]}", raw))
        raise HeaderError(f"{key}: unknown value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of the GGUF at `path` (which must start with the magic)."""
    with path.open("rb") as raw_fh:
        r = _Reader(raw_fh)
        if r.take(4) != b"GGUF":
            raise HeaderError("not a GGUF file")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise HeaderError(f"unsupported GGUF version {version}")
        n_tensors = r.unpack("<Q")
        n_kv = r.unpack("<Q")
        if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise HeaderError("counts out of range")
        header = GGUFHeader(version=version)
        for _ in range(n_kv):
            start = raw_fh.tell()
            key = r.string()
            vtype = r.unpack("<I")
            header.fields[key] = r.value(vtype, key)
            header.spans[key] = (start, raw_fh.tell())
            header.value_types[key] = vtype
        header.fields_end = raw_fh.tell()
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > 8:
                raise HeaderError(f"tensor {name}: {n_dims} dimensions")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            ggml_type = r.unpack("<I")
            offset = r.unpack("<Q")
            header.tensors.append(TensorEntry(name, shape, ggml_type, offset))
        alignment = int(header.fields.get("general.alignment", 32) or 32)
        pos = raw_fh.tell()
        header.tensors_end = pos
        header.alignment = alignment
        header.data_offset = pos + (-pos % alignment)
    return header


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def encode_entry(key: str, value: Any, vtype: int) -> bytes:
    """One key/value entry in GGUF's encoding (scalars, strings, arrays of scalars)."""
    out = encode_string(key) + struct.pack("<I", vtype)
    if vtype in _SCALARS:
        return out + struct.pack(_SCALARS[vtype], value)
    if vtype == _STRING:
        return out + encode_string(value)
    if vtype == _ARRAY:
        items = list(value)
        itype = 5 if all(isinstance(v, int) for v in items) else _STRING
        out += struct.pack("<IQ", itype, len(items))
        if itype == _STRING:
            return out + b"".join(encode_string(v) for v in items)
        return out + struct.pack(f"<{len(items)}i", *items)
    raise HeaderError(f"{key}: cannot encode value type {vtype}")
