"""The package's layers import downward only, and only the TUI imports Textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "starling_local"

#: layer -> the layers it must not import
FORBIDDEN = {
    "engine": {"chat", "tui", "cli", "store", "bench"},
    "store": {"chat", "tui", "cli", "engine", "acquire", "bench"},
    "acquire": {"chat", "tui", "cli", "store", "bench"},
    "chat": {"tui", "cli", "bench"},
    "bench": {"cli"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_tui_imports_textual() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "tui" not in p.relative_to(PACKAGE).parts
        and any(n == "textual" or n.startswith("textual.") for n in imports_of(p))
    ]
    assert offenders == []


def test_layers_import_downward_only() -> None:
    offenders = []
    for layer, forbidden in FORBIDDEN.items():
        for path in (PACKAGE / layer).rglob("*.py"):
            for name in imports_of(path):
                parts = name.split(".")
                if parts[0] == "starling_local" and len(parts) > 1 and parts[1] in forbidden:
                    offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_importing_the_package_does_no_io(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code = (
        "import importlib, pkgutil, starling_local\n"
        "for m in pkgutil.walk_packages(starling_local.__path__, 'starling_local.'):\n"
        "    if m.name != 'starling_local.__main__':\n"
        "        importlib.import_module(m.name)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={"STARLING_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert not home.exists()  # nothing was created by importing every module
