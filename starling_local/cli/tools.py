"""`starling convert`, `starling quantize` and `starling doctor`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from starling_local.acquire.quantize import DEFAULT_QUANT
from starling_local.errors import UsageError


def register(sub: Any) -> None:
    c = sub.add_parser(
        "convert",
        help="convert a Hugging Face safetensors checkpoint to GGUF (and quantize it)",
    )
    c.add_argument("source", help="checkpoint directory, or a Hub repo id to download")
    c.add_argument("--out", "-o", type=Path, help="output .gguf (default: in the models folder)")
    c.add_argument("--out-dir", type=Path, help="folder for the results (default: models folder)")
    c.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16")
    c.add_argument(
        "--quant",
        nargs="+",
        default=[],
        metavar="QUANT",
        help="quantize after converting, to one or more of e.g. Q4_K_M Q5_K_M Q8_0 "
        "(the checkpoint is converted once)",
    )
    c.add_argument("--keep-f16", action="store_true", help="keep the unquantized GGUF too")
    c.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all)")
    c.add_argument("--revision", help="with a repo id: branch, tag or commit")
    c.add_argument(
        "--keep-checkpoint", action="store_true", help="with a repo id: keep the downloaded weights"
    )
    c.set_defaults(handler=run_convert)

    q = sub.add_parser("quantize", help="quantize a GGUF with llama.cpp")
    q.add_argument("input", type=Path)
    q.add_argument("output", type=Path)
    q.add_argument("--quant", default=DEFAULT_QUANT, help=f"quantization (default {DEFAULT_QUANT})")
    q.add_argument("--threads", type=int, default=0)
    q.set_defaults(handler=run_quantize)

    d = sub.add_parser("doctor", help="what this installation can do (GPU offload, paths, disk)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=run_doctor)


def run_convert(args: argparse.Namespace) -> int:
    from starling_local.acquire.pipeline import convert
    from starling_local.progress import ProgressLine

    entries = convert(
        args.source,
        quants=args.quant,
        outtype=args.outtype,
        out=args.out,
        out_dir=args.out_dir,
        revision=args.revision,
        keep_intermediate=args.keep_f16,
        keep_checkpoint=args.keep_checkpoint,
        n_threads=args.threads,
        progress_factory=ProgressLine,
    )
    for entry in entries:
        print(f"{entry.name}\t{entry.path}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from starling_local.acquire.quantize import normalize_quant, quantize
    from starling_local.progress import ProgressLine, progress_bar

    quant = normalize_quant(args.quant)
    if args.output.exists() and args.output.is_dir():
        raise UsageError(f"{args.output}: is a directory")
    with progress_bar(ProgressLine, f"Quantizing to {quant}") as bar:
        quantize(args.input, args.output, quant, args.threads, progress=bar)
    print(args.output)
    return 0


GPU_HINT = (
    "for GPU offload reinstall llama-cpp-python from source with a GPU backend: "
    'CMAKE_ARGS="-DGGML_CUDA=on" (NVIDIA) or "-DGGML_METAL=on" (Apple) '
    "pip install --force-reinstall --no-cache-dir llama-cpp-python"
)


def doctor_report() -> dict[str, Any]:
    """Facts about this installation, as `starling doctor --json` prints them."""
    from starling_local import __version__
    from starling_local.files import free_bytes
    from starling_local.llamacpp.cpu_kernels import cpu_kernels
    from starling_local.llamacpp.system import backend, llama_cpp_version, physical_cores
    from starling_local.paths import get_paths

    paths = get_paths()
    kind = backend()
    kernels = cpu_kernels()
    return {
        "starling_local": __version__,
        "python": sys.version.split()[0],
        "llama_cpp_python": llama_cpp_version(),
        "backend": kind,
        "gpu_offload": kind != "CPU",
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "cpu_kernels": {
            "extra_buffer_types": list(kernels.buffer_types),
            "available": list(kernels.available),
            "reason": kernels.reason,
        },
        "paths": {
            "data": str(paths.data),
            "cache": str(paths.cache),
            "config": str(paths.config),
            "logs": str(paths.logs),
            "models": str(paths.models),
        },
        "free_disk_bytes": free_bytes(paths.data),
        "hint": None if kind != "CPU" else GPU_HINT,
    }


def cpu_kernels_line(kernels: dict[str, Any]) -> str:
    """`CPU_REPACK (AMX unusable: the probe died with SIGILL (cached probe))`."""
    used = " + ".join(kernels["extra_buffer_types"]) or "plain weights"
    return f"{used} ({kernels['reason']})"


def run_doctor(args: argparse.Namespace) -> int:
    from starling_local.files import human_bytes

    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [
        ("starling-local", report["starling_local"]),
        ("python", report["python"]),
        ("llama-cpp-python", report["llama_cpp_python"]),
        ("backend", report["backend"] + (" (GPU offload)" if report["gpu_offload"] else "")),
        ("CPU threads", f"{report['physical_cores']} physical / {report['logical_cpus']} logical"),
        ("CPU kernels", cpu_kernels_line(report["cpu_kernels"])),
        *((f"{k} dir", v) for k, v in report["paths"].items()),
        ("free disk", human_bytes(report["free_disk_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if report["hint"]:
        with contextlib.suppress(BrokenPipeError):
            print(f"\nCPU only: {report['hint']}")
    return 0
