"""A small safetensors reader (memory-mapped, one tensor at a time) and writer.

numpy has no bfloat16: bf16 is read as uint16 and widened to float32 by a 16-bit shift.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

_DTYPES: dict[str, Any] = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """The file is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives; nothing is read until `load()`."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def load_f32(self) -> npt.NDArray[np.float32]:
        """The tensor as float32, read through a memory map."""
        return self.load_rows_f32(0, self.shape[0] if self.shape else 1)

    def load_rows_f32(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        """Rows `start:stop` (of the first dimension) as float32; only they are read."""
        if self.dtype not in _DTYPES:
            raise SafetensorsError(f"{self.path.name}: {self.name}: unsupported dtype {self.dtype}")
        item = np.dtype(_DTYPES[self.dtype]).itemsize
        row = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        raw = np.memmap(
            self.path,
            dtype=_DTYPES[self.dtype],
            mode="r",
            offset=self.offset + start * row * item,
            shape=shape,
        )
        try:
            if self.dtype == "BF16":
                wide = raw.astype(np.uint32)
                wide <<= 16
                out: npt.NDArray[np.float32] = wide.view(np.float32)
                return out
            return np.array(raw, dtype=np.float32)
        finally:
            del raw


def read_header(path: Path) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, checked against its size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise SafetensorsError(f"{path}: not a safetensors file (bad header length)")
        try:
            meta = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{path}: not a safetensors file (bad header)") from exc
    base = 8 + n
    refs = {}
    for name, spec in meta.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        if base + end > size:
            raise SafetensorsError(f"{path}: truncated (tensor {name} ends past the file)")
        refs[name] = TensorRef(
            path, name, spec["dtype"], tuple(spec["shape"]), base + start, end - start
        )
    return refs


def iter_checkpoint(directory: Path) -> Iterator[TensorRef]:
    """Every tensor of a (possibly sharded) checkpoint, shard by shard."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"{directory}: no *.safetensors files")
    for name in files:
        path = directory / name
        if not path.exists():
            raise SafetensorsError(f"{directory}: shard {name} is missing")
        yield from read_header(path).values()


def to_bf16_bits(array: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 to bfloat16 (nearest even) and return the raw 16-bit patterns."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(
    path: Path,
    specs: Sequence[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], npt.NDArray[Any]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors `(name, dtype, shape)`, asking `produce(name)` for each one in turn.

    A BF16 tensor is produced as its uint16 bit patterns. Only one tensor is in memory at a time.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, dtype, shape in specs:
            array = np.ascontiguousarray(produce(name), dtype=_DTYPES[dtype])
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {array.shape}, declared {shape}")
            fh.write(array.data)
