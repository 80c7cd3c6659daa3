"""Quantizing a GGUF with llama.cpp's own quantizer."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path

from starling_local.errors import StarlingError, UsageError
from starling_local.files import atomic_output, require_free_space
from starling_local.gguf.info import check_runnable
from starling_local.llamacpp.system import route_llama_log
from starling_local.paths import get_paths
from starling_local.progress import Progress

#: Quantization name -> approximate bits per weight (for the disk-space estimate).
QUANT_BITS: dict[str, float] = {
    "Q2_K": 3.0,
    "Q3_K_S": 3.5,
    "Q3_K_M": 3.9,
    "Q3_K_L": 4.3,
    "IQ4_XS": 4.3,
    "IQ4_NL": 4.6,
    "Q4_0": 4.6,
    "Q4_1": 5.0,
    "Q4_K_S": 4.6,
    "Q4_K_M": 4.9,
    "Q5_0": 5.6,
    "Q5_1": 6.0,
    "Q5_K_S": 5.6,
    "Q5_K_M": 5.7,
    "Q6_K": 6.6,
    "Q8_0": 8.5,
    "F16": 16.0,
    "BF16": 16.0,
}
DEFAULT_QUANT = "Q4_K_M"


class QuantizeError(StarlingError):
    """llama.cpp could not quantize the file."""


def normalize_quant(name: str) -> str:
    """`q4_k_m` -> `Q4_K_M`; refuse names llama.cpp's quantizer does not offer."""
    upper = name.strip().upper()
    if upper not in QUANT_BITS:
        raise UsageError(f"unknown quantization {name!r}; choose one of: {', '.join(QUANT_BITS)}")
    return upper


def ftype_of(quant: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}"))


def estimate_size(n_params: int, quant: str) -> int:
    """A generous estimate of the quantized file's size."""
    return int(n_params * QUANT_BITS[quant] / 8 * 1.1) + (16 << 20)


def quantize(
    src: Path,
    dst: Path,
    quant: str = DEFAULT_QUANT,
    n_threads: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Quantize `src` to `dst` with llama.cpp; `dst` appears only when complete.

    llama.cpp runs in a worker thread so that Ctrl-C is seen at once (the partial file is then
    removed) and progress can be reported from the growing output file.
    """
    import llama_cpp

    quant = normalize_quant(quant)
    info = check_runnable(src)
    if src.resolve() == dst.resolve():
        raise UsageError("the output must be a different file from the input")
    estimate = estimate_size(info.n_params, quant)
    require_free_space(dst.parent, estimate, dst.name)
    route_llama_log(get_paths().engine_log)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = n_threads
    result: list[int] = []
    with atomic_output(dst) as tmp:

        def work() -> None:
            result.append(
                llama_cpp.llama_model_quantize(
                    str(src).encode("utf-8"), str(tmp).encode("utf-8"), ctypes.byref(params)
                )
            )

        worker = threading.Thread(target=work, name="quantize", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if progress is not None:
                with contextlib.suppress(OSError):
                    progress(tmp.stat().st_size, estimate, quant)
        rc = result[0] if result else -1
        if rc != 0:
            raise QuantizeError(f"llama.cpp failed to quantize {src} to {quant} (code {rc})")
    return dst
