"""Running the real `starling` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def starling(
    *args: str | Path, stdin: str | None = None, home: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["STARLING_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "starling_local", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("starling: error:")
    assert text in lines[0], lines[0]
