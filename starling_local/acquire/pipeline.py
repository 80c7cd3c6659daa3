"""Checkpoint -> GGUF -> quantized GGUF, as one step with one set of guarantees."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starling_local.acquire.convert import OutType, convert_checkpoint
from starling_local.acquire.files import partial_path
from starling_local.acquire.quantize import normalize_quant, quantize
from starling_local.errors import UsageError
from starling_local.paths import ensure, get_paths

ProgressFactory = Callable[[str], Any]


def default_output(source: Path, tag: str) -> Path:
    """`<models dir>/<checkpoint name>-<tag>.gguf`."""
    return ensure(get_paths().models) / f"{source.name.lower()}-{tag}.gguf"


def convert_and_quantize(
    source: Path,
    *,
    out: Path | None = None,
    outtype: str = "f16",
    quant: str | None = None,
    keep_intermediate: bool = False,
    n_threads: int = 0,
    progress_factory: ProgressFactory | None = None,
) -> Path:
    """Convert `source` (and quantize when `quant` is given); return the final GGUF path.

    With `quant`, the unquantized GGUF is an intermediate: it is removed afterwards unless
    `keep_intermediate`, in which case it stays beside the result as `<name>.<outtype>.gguf`.
    """
    try:
        kind = OutType(outtype)
    except ValueError:
        raise UsageError(f"unknown --outtype {outtype!r}: choose f32, f16 or bf16") from None
    quant = normalize_quant(quant) if quant else None
    final = out or default_output(source, quant or kind.value)
    if final.suffix != ".gguf":
        raise UsageError(f"{final}: the output should end in .gguf")

    def bar(label: str) -> Any:
        return progress_factory(label) if progress_factory else None

    if quant is None:
        progress = bar("Converting")
        try:
            return convert_checkpoint(source, final, kind, progress, name=source.name)
        finally:
            if progress is not None:
                progress.close()

    if keep_intermediate:
        intermediate = final.with_name(f"{final.stem}.{kind.value}.gguf")
    else:
        intermediate = partial_path(final).with_suffix(f".{kind.value}.gguf")
    try:
        progress = bar("Converting")
        try:
            convert_checkpoint(source, intermediate, kind, progress, name=source.name)
        finally:
            if progress is not None:
                progress.close()
        progress = bar(f"Quantizing to {quant}")
        try:
            quantize(intermediate, final, quant, n_threads, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    finally:
        if not keep_intermediate:
            with contextlib.suppress(OSError):
                intermediate.unlink()
    return final
