"""Which of llama.cpp's CPU kernels run on this machine: AMX, repacked weights, or plain.

ggml's CPU backend offers "extra" buffer types for weights: `AMX` (int8 tile kernels, Intel
Xeons) and `CPU_REPACK` (weights interleaved for AVX2/AVX-512/NEON kernels). llama.cpp puts each
weight in the first extra type that can take it, AMX first. On virtual machines that advertise
AMX without enabling it, the AMX kernels die with SIGILL on the first prompt, while repacked
weights run fine and decode about 1.2x faster than plain ones.

So AMX is probed, not guessed: a child process runs the AMX kernels once (`amx_probe`); a child
killed by a signal means "AMX unusable here". The verdict is cached per llama.cpp build, CPU
and kernel release. Where AMX is unusable it is taken out of the list of extra buffer types
that llama.cpp reads when it loads a model, and repacking stays on.

Why not `tensor_buft_overrides`: llama.cpp applies an override to a non-CPU buffer type without
asking whether that type supports the tensor (`llama_model_loader::create_tensor`), and
CPU_REPACK dereferences a null repack plan for tensors it cannot take; an override to the CPU
buffer type re-selects from the list that has AMX first. The list itself is what llama.cpp
consults for every weight, with its own support checks, so that is what is narrowed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AMX = "AMX"
REPACK = "CPU_REPACK"
#: `enum ggml_backend_dev_type`: GGML_BACKEND_DEVICE_TYPE_CPU.
_DEVICE_TYPE_CPU = 0
#: A probe that runs longer than this is taken as a failure (not cached).
PROBE_TIMEOUT_S = 120.0

_lock = threading.Lock()
_chosen: CpuKernels | None = None


@dataclass(frozen=True)
class CpuKernels:
    """The extra CPU buffer types llama.cpp may put weights in, and why."""

    buffer_types: tuple[str, ...]
    """In llama.cpp's order of preference, e.g. `("CPU_REPACK",)`; empty: plain weights only."""
    available: tuple[str, ...]
    """What this build offers on this machine."""
    reason: str

    @property
    def amx(self) -> bool:
        return AMX in self.buffer_types

    @property
    def repack(self) -> bool:
        return REPACK in self.buffer_types

    def model_params(self) -> dict[str, bool]:
        """`llama_model_params` fields for a load (the list itself is narrowed already)."""
        return {} if self.buffer_types else {"use_extra_bufts": False}

    @property
    def whole_list(self) -> bool:
        """Whether llama.cpp's own default (every extra buffer type) is what is used: the
        question for llama.cpp's programs (llama-server, llama-bench), which have only
        `--no-repack` to turn them all off."""
        return self.buffer_types == self.available

    def describe(self) -> str:
        """`CPU_REPACK (AMX unusable: the probe died with SIGILL)`, for doctor and bench."""
        return f"{' + '.join(self.buffer_types) or 'plain weights'} ({self.reason})"


@dataclass(frozen=True)
class ProbeResult:
    usable: bool
    detail: str
    definite: bool
    """Whether the result says something about the machine (a clean exit or a signal), not a
    failure of the probe itself; only definite results are cached."""


# --- the list llama.cpp reads --------------------------------------------------------------------


class _ExtraBufferList:
    """The NULL-terminated array `ggml_backend_dev_get_extra_bufts` returns for the CPU
    device. llama.cpp's `make_cpu_buft_list` walks it at every model load; ggml keeps it in a
    static vector, so rewriting its entries (never past the original end) changes what the next
    load may use, and the original order can always be written back."""

    def __init__(self) -> None:
        lib = _ggml()
        lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.ggml_backend_buft_name.restype = ctypes.c_char_p
        lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        self._names: dict[int, str] = {}
        self._array: ctypes.Array[ctypes.c_void_p] | None = None
        device = lib.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
        if not device:
            return
        reg = lib.ggml_backend_dev_backend_reg(device)
        address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return
        getter = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
        pointer = getter(device)
        if not pointer:
            return
        original: list[int] = []
        while pointer[len(original)]:
            original.append(int(pointer[len(original)]))
        self._array = (ctypes.c_void_p * (len(original) + 1)).from_address(
            ctypes.addressof(pointer.contents)
        )
        self._original = original
        for buft in original:
            self._names[buft] = (lib.ggml_backend_buft_name(buft) or b"?").decode()

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(self._names[b] for b in getattr(self, "_original", []))

    def keep(self, names: tuple[str, ...]) -> None:
        """Leave only the buffer types named (in their original order) for later loads."""
        if self._array is None:
            return
        kept = [b for b in self._original if self._names[b] in names]
        for i in range(len(self._original) + 1):
            self._array[i] = kept[i] if i < len(kept) else None


_list: _ExtraBufferList | None = None


def _extra_buffer_list() -> _ExtraBufferList:
    global _list
    if _list is None:
        _list = _ExtraBufferList()
    return _list


def _ggml() -> ctypes.CDLL:
    from llama_cpp import _ggml as ggml_lib

    return ggml_lib.libggml  # type: ignore[no-any-return]


def available_buffer_types() -> tuple[str, ...]:
    """The extra CPU buffer types this llama.cpp build offers on this machine, in order."""
    with _lock:
        return _extra_buffer_list().available


def use_buffer_types(names: tuple[str, ...]) -> None:
    """Let models loaded from now on use only these extra CPU buffer types."""
    with _lock:
        _extra_buffer_list().keep(names)


# --- the verdict ---------------------------------------------------------------------------------


def cpu_kernels() -> CpuKernels:
    """The extra buffer types to use here (probing AMX once, if the build has it), applied to
    llama.cpp's list so that every later model load uses exactly these."""
    global _chosen
    with _lock:
        if _chosen is not None:
            return _chosen
    chosen = choose(available_buffer_types(), setting(), verdict=amx_verdict)
    use_buffer_types(chosen.buffer_types)
    with _lock:
        _chosen = chosen
    return chosen


def setting() -> str:
    from starling_local.config import environment

    return environment().cpu_extra_buffers


def choose(
    available: tuple[str, ...],
    switch: str,
    verdict: Callable[[], tuple[ProbeResult, bool]],
) -> CpuKernels:
    """What to use given what the build offers, `STARLING_CPU_EXTRA_BUFFERS` and the AMX
    verdict (`verdict()` gives it and whether it was cached; called only when it matters)."""
    if switch == "on":
        return CpuKernels(available, available, "STARLING_CPU_EXTRA_BUFFERS=on")
    if switch == "off":
        return CpuKernels((), available, "STARLING_CPU_EXTRA_BUFFERS=off")
    if AMX not in available:
        return CpuKernels(available, available, "this llama.cpp build has no AMX kernels")
    result, cached = verdict()
    how = "cached probe" if cached else "probed"
    if result.usable:
        return CpuKernels(available, available, f"AMX works ({how})")
    rest = tuple(name for name in available if name != AMX)
    return CpuKernels(rest, available, f"AMX unusable: {result.detail} ({how})")


def amx_verdict() -> tuple[ProbeResult, bool]:
    """The cached verdict for this build, CPU and kernel, or a fresh probe (cached if definite)."""
    cache = verdict_file()
    key = machine_key()
    cached = read_verdict(cache, key)
    if cached is not None:
        return cached, True
    result = run_probe()
    if result.definite:
        write_verdict(cache, key, result)
    return result, False


def verdict_file() -> Path:
    from starling_local.paths import get_paths

    return get_paths().cache / "cpu-kernels.json"


def machine_key() -> str:
    """llama.cpp build, CPU model and flags, kernel release: what the verdict depends on."""
    import llama_cpp

    from starling_local.llamacpp.system import llama_cpp_version

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
                if line.startswith("flags"):
                    break
    except OSError:
        cpu = platform.processor()
    build = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    parts = [llama_cpp_version(), build, cpu, platform.release(), _library_stamp()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _library_stamp() -> str:
    """The ggml CPU library's size and mtime: a rebuild of the same version is another build."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    try:
        return ";".join(
            f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in sorted(folder.glob("*ggml-cpu*"))
        )
    except OSError:
        return ""


def read_verdict(path: Path, key: str) -> ProbeResult | None:
    try:
        data = json.loads(path.read_text())
        entry = data[key]
        return ProbeResult(bool(entry["usable"]), str(entry["detail"]), True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verdict(path: Path, key: str, result: ProbeResult) -> None:
    """Best effort: a verdict that cannot be saved is probed again next time."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"usable": result.usable, "detail": result.detail}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass


def run_probe(command: list[str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the AMX kernels in a child process (`python -m starling_local.llamacpp.amx_probe`)
    and read how it ended."""
    command = command or [sys.executable, "-m", "starling_local.llamacpp.amx_probe"]
    env = dict(os.environ, STARLING_CPU_EXTRA_BUFFERS="on")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"the probe did not finish in {timeout:.0f} s", False)
    except OSError as exc:
        return ProbeResult(False, f"the probe could not start: {exc}", False)
    if done.returncode == 0:
        return ProbeResult(True, "the probe ran AMX kernels", True)
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return ProbeResult(False, f"the probe died with {name}", True)
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return ProbeResult(False, f"the probe failed (exit {done.returncode}: {last})", False)


def reset_for_tests() -> None:
    """Forget the process's choice and restore llama.cpp's full list."""
    global _chosen
    with _lock:
        _chosen = None
        lst = _extra_buffer_list()
        lst.keep(lst.available)
