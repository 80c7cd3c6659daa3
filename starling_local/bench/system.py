"""Start-up time and converter memory, measured in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def help_seconds(runs: int = 5) -> float:
    """Best wall time of `starling --help` in a new interpreter."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "starling_local", "--help"], check=True, capture_output=True
        )
        best = min(best, time.perf_counter() - start)
    return best


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from a big parent
# would report the parent's size.
_CONVERT_AND_MEASURE = """
import json, re, resource, sys
from pathlib import Path
from starling_local.acquire.convert import convert_checkpoint, OutType
convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), OutType.F16)
try:
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss_bytes": peak}))
"""


def conversion_peak(shape_name: str, workdir: Path | None = None) -> dict[str, float]:
    """Peak RSS of converting a synthetic checkpoint of `shape_name` to F16, in a fresh process."""
    from starling_local.acquire.synthetic import SHAPES, make_checkpoint

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", SHAPES[shape_name], shards=3)
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _CONVERT_AND_MEASURE, str(ckpt), str(Path(tmp) / "out.gguf")],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return {
        "checkpoint_bytes": size,
        "peak_rss_bytes": peak,
        "seconds": seconds,
        "params": SHAPES[shape_name].n_params,
    }
