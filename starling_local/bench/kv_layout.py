"""Re-lay a saved KV cache for another attention configuration, so that the long-context
benchmark evaluates each depth's prompt once instead of once per configuration (on the 7B shape
a 2-core CPU evaluates about 10 prompt tokens a second: 13 minutes to reach depth 7,936).

The bytes are llama.cpp's sequence state (`llama_state_seq_get_data` in llama-context.cpp,
then `state_write` in llama-kv-cache.cpp): u32 magic 0xaf143cd8, i32 sequence id, u32 stream
count; per stream a u32 cell count, then per cell an i32 position, a u32 sequence count and that
many i32 sequence ids; then u32 `v_trans`, u32 layer count; per layer i32 K type, u64 K row
size and the K rows; then per layer either i32 V type, u64 row size and the V rows (`v_trans`
0, flash attention on), or i32 V type, u32 element size, u32 row width and the V rows
transposed (`v_trans` 1, flash attention off).

Only what the benchmark needs is handled: an f16 cache written with flash attention on, turned
into an f16 cache for flash attention off (V transposed) or a q8_0 cache. A quantized cache
holds its rows rotated (llama-kv-cache.cpp, `attn_rot_k` / `attn_rot_v`, unless
LLAMA_ATTN_ROT_DISABLE is set): each head's K by an orthonormal Walsh-Hadamard matrix of the
largest power of two dividing the head size, V in blocks of 64, where the head size is a
multiple of 64; the query is rotated the same way, so attention is unchanged. The rows are then
quantized as llama.cpp's reference `quantize_row_q8_0` does. Decode speed does not depend on
the values in the cache, and these keep them as close as the target type allows.
"""

from __future__ import annotations

import functools
import os
import struct

import llama_cpp  # noqa: F401  (before numpy: see the note in bench/runner.py)
import numpy as np

#: ggml type ids (ggml.h).
GGML_F16 = 1
GGML_Q8_0 = 8
#: `io_magic` of llama-context.cpp, the first word of a sequence state.
MAGIC = 0xAF143CD8
_Q8_BLOCK = np.dtype([("d", "<f2"), ("q", "i1", (32,))])


class LayoutError(ValueError):
    """The state is not an f16, flash-attention cache of one stream."""


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data).cast("B")
        self.at = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.view, self.at)
        self.at += struct.calcsize(fmt)
        return int(value)

    def raw(self, n: int) -> memoryview:
        chunk = self.view[self.at : self.at + n]
        if len(chunk) != n:
            raise LayoutError("the state ends early")
        self.at += n
        return chunk


def _q8_0(rows: np.ndarray) -> bytes:
    """f16 rows quantized to q8_0 blocks of 32 (a scale `amax / 127`, then 32 int8)."""
    x = rows.astype(np.float32).reshape(-1, 32)  # f16 or already-rotated f32
    d = np.abs(x).max(axis=1) / 127.0
    inverse = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    scaled = x * inverse[:, None]
    blocks = np.empty(len(x), dtype=_Q8_BLOCK)
    blocks["d"] = d.astype(np.float16)
    blocks["q"] = np.trunc(scaled + np.copysign(0.5, scaled)).astype(np.int8)  # roundf
    return blocks.tobytes()


@functools.cache
def hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of size `n` (a power of two), as llama.cpp builds
    it (`ggml_gen_hadamard`): entry (i, j) is (-1)^popcount(i & j) / sqrt(n). Built once
    per size (not per layer); read-only."""
    i = np.arange(n)
    parity = np.vectorize(lambda v: bin(v).count("1") & 1)(i[:, None] & i[None, :])
    matrix: np.ndarray = (np.where(parity == 1, -1.0, 1.0) / np.sqrt(n)).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _rotated(rows: np.ndarray, size: int) -> np.ndarray:
    x = rows.astype(np.float32).reshape(-1, size)
    rotated: np.ndarray = (x @ hadamard(size)).reshape(rows.shape)
    return rotated


def _rotations(head_size: int) -> tuple[int, int]:
    """The rotation sizes of K and V in a quantized cache (0: not rotated)."""
    if os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0").strip() not in ("", "0"):
        return 0, 0
    if head_size <= 0 or head_size % 64:
        return 0, 0
    return head_size & -head_size, 64


def convert(
    state: bytes | bytearray | memoryview, *, kv_type: str, flash_attn: bool, n_head_kv: int
) -> bytes:
    """`state` (an f16 cache saved with flash attention on) laid out for a context with
    `kv_type` ("f16" or "q8_0") and `flash_attn`, for a model with `n_head_kv` KV heads."""
    if kv_type not in ("f16", "q8_0"):
        raise LayoutError(f"unknown KV cache type {kv_type!r}")
    if kv_type == "q8_0" and not flash_attn:
        raise LayoutError("a q8_0 cache needs flash attention")
    r = _Reader(state)
    if r.take("I") != MAGIC:
        raise LayoutError("not a llama.cpp sequence state")
    out = bytearray(struct.pack("<Ii", MAGIC, r.take("i")))
    if r.take("I") != 1:
        raise LayoutError("only a single-stream cache can be converted")
    cells = r.take("I")
    out += struct.pack("<II", 1, cells)
    if cells == 0:
        return bytes(out)
    meta_start = r.at
    for _ in range(cells):
        r.take("i")
        r.raw(4 * r.take("I"))
    out += r.view[meta_start : r.at]
    if r.take("I") != 0:
        raise LayoutError("the source cache was saved with flash attention off")
    layers = r.take("I")
    out += struct.pack("<II", 0 if flash_attn else 1, layers)
    k_rot = v_rot = 0
    for layer in range(layers):  # keys: one row per cell
        rows = _f16_rows(r, cells)
        if kv_type == "q8_0":
            if layer == 0:
                k_rot, v_rot = _rotations(rows.shape[1] // n_head_kv)
            data = _q8_0(_rotated(rows, k_rot) if k_rot else rows)
            out += struct.pack("<iQ", GGML_Q8_0, len(data) // cells) + data
        else:
            out += struct.pack("<iQ", GGML_F16, rows.shape[1] * 2) + rows.tobytes()
    for _ in range(layers):  # values
        rows = _f16_rows(r, cells)
        if kv_type == "q8_0":
            data = _q8_0(_rotated(rows, v_rot) if v_rot else rows)
            out += struct.pack("<iQ", GGML_Q8_0, len(data) // cells) + data
        elif flash_attn:
            out += struct.pack("<iQ", GGML_F16, rows.shape[1] * 2) + rows.tobytes()
        else:
            out += struct.pack("<iII", GGML_F16, 2, rows.shape[1]) + rows.T.tobytes()
    if r.at != len(r.view):
        raise LayoutError("unexpected bytes after the cache")
    return bytes(out)


def _f16_rows(r: _Reader, cells: int) -> np.ndarray:
    kind = r.take("i")
    row_size = r.take("Q")
    if kind != GGML_F16:
        raise LayoutError(f"the source cache is not f16 (ggml type {kind})")
    if row_size % 64:
        raise LayoutError(f"a row of {row_size} bytes is not whole blocks of 32")
    data = r.raw(row_size * cells)
    return np.frombuffer(data, dtype="<f2").reshape(cells, row_size // 2)
