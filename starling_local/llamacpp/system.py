"""What this machine and this llama-cpp-python build can do, and where llama.cpp logs go."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from pathlib import Path
from typing import Any

_log_lock = threading.Lock()
_log_state: dict[str, Any] = {}


def physical_cores() -> int:
    """Physical cores available to this process (decoding gains nothing from SMT siblings)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        sibling_file = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list")
        if not sibling_file.exists():
            sibling_file = sibling_file.with_name("thread_siblings_list")
        try:
            cores.add(sibling_file.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    if platform.system() == "Darwin":
        import subprocess

        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True
            )
            return max(1, int(out.stdout.strip()))
        except (OSError, ValueError):
            pass
    return max(1, len(cores))


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def backend() -> str:
    """`CUDA`, `Metal`, `Vulkan`, ... or `CPU`: the GPU backend compiled into llama.cpp."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").upper()
    for name, label in (
        ("CUDA", "CUDA"),
        ("METAL", "Metal"),
        ("VULKAN", "Vulkan"),
        ("HIP", "ROCm"),
        ("SYCL", "SYCL"),
    ):
        if name in info:
            return label
    return "GPU"


def route_llama_log(path: Path) -> None:
    """Send llama.cpp's log lines to `path` (appending) instead of the terminal."""
    import llama_cpp

    with _log_lock:
        if _log_state.get("path") == path:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        old = _log_state.get("file")
        fh = path.open("a", encoding="utf-8", errors="replace")

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            try:
                fh.write(text.decode("utf-8", "replace"))
                if level in (2, 3):  # warnings and errors reach the file at once
                    fh.flush()
            except (ValueError, OSError):
                # ValueError: closed (a model freed as the interpreter exits logs late);
                # OSError: the disk is full. The log is worth less than the reply.
                pass

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        # The callback must outlive this call: ctypes does not keep it alive for C.
        _log_state.update(path=path, file=fh, callback=callback)
        if old is not None:
            old.close()


def last_log_error(path: Path, limit: int = 4096) -> str:
    """The last error-looking line llama.cpp wrote, to explain a failed load."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            tail = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(tail):
        low = line.lower()
        if "error" in low or "failed" in low or "invalid" in low:
            return line.strip()
    return ""


def extra_buffers_enabled() -> bool:
    """Whether llama.cpp's programs (llama-server, llama-bench) may run with their default extra
    CPU buffer types, as the engine runs (see `cpu_kernels`); if not, they need `--no-repack`."""
    from starling_local.llamacpp.cpu_kernels import cpu_kernels

    return cpu_kernels().whole_list
