"""The package's layers import downward only, and only the TUI imports Textual.

The table below is the whole intended shape: every package and base module of
`starling_local`, and what each may import. A module not in it, or an import not allowed by
it, fails the test (a new module has to be placed in the table on purpose).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "starling_local"

#: The base: modules and packages that import no layer, only each other as listed.
BASE_TABLE: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "vocab": set(),
    "paths": set(),
    "config": {"paths", "errors"},
    "files": {"errors"},
    "progress": {"files"},
    "gguf": {"errors", "vocab", "files"},
    "llamacpp": {"config", "paths"},
}
BASE = set(BASE_TABLE) - {"__init__"}

#: The layers, top to bottom, and what each may import (besides itself).
LAYER_TABLE: dict[str, set[str]] = {
    "store": {"errors", "paths", "config"},
    "engine": {"errors", "paths", "config", "vocab", "files", "gguf", "llamacpp"},
    "acquire": BASE,
    "chat": {"engine", "store", "acquire"} | BASE,
    "tui": {"chat", "engine", "store", "acquire"} | BASE,
    "server": {"chat", "engine", "store", "acquire"} | BASE,
    "bench": {"tui", "chat", "engine", "store", "acquire"} | BASE,
    "cli": {"server", "tui", "bench", "chat", "engine", "store", "acquire", "__init__"} | BASE,
    "__main__": {"cli"},
}
TABLE = {**BASE_TABLE, **LAYER_TABLE}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "starling_local":  # `from starling_local import __version__`
                names |= {f"starling_local.{a.name}" for a in node.names}
    return names


def unit_of(module: str) -> str:
    """`starling_local.chat.service` -> `chat`; `starling_local.paths` -> `paths`."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    is_module = (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").exists()
    return parts[1] if is_module else "__init__"  # `from starling_local import __version__`


def unit_of_file(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_is_in_the_table() -> None:
    units = {unit_of_file(p) for p in PACKAGE.rglob("*.py")}
    assert units - set(TABLE) == set(), "place new modules in the layer table"
    assert set(TABLE) - units == set(), "the table names modules that no longer exist"


def test_layers_import_only_what_the_table_allows() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of_file(path)
        allowed = TABLE[unit] | {unit}
        for name in sorted(imports_of(path)):
            if name == "starling_local" or name.startswith("starling_local."):
                target = unit_of(name)
                if name != "starling_local" and target not in allowed:
                    offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_the_table_reads_downward() -> None:
    """No cycles: each unit's allowed imports sit strictly below it."""
    order = list(TABLE)
    for unit, allowed in TABLE.items():
        above = set(order[order.index(unit) :])
        assert allowed & above == set(), f"{unit} may import {allowed & above} above it"


def test_only_the_server_imports_the_web_stack() -> None:
    web = ("starlette", "uvicorn")
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0] not in ("server", "cli")
        and any(n.split(".")[0] in web for n in imports_of(p))
    ]
    assert offenders == []


def test_only_the_tui_imports_textual() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "tui" not in p.relative_to(PACKAGE).parts
        and any(n == "textual" or n.startswith("textual.") for n in imports_of(p))
    ]
    assert offenders == []


def test_only_the_adapter_touches_llama_cpp_python_private_parts() -> None:
    """`_ctx`, `_batch`, `_init_sampler`, `input_ids`, `n_tokens` and the patched defaults."""
    private = (
        "._ctx",
        "._batch",
        "._init_sampler",
        ".input_ids",
        ".n_tokens",
        "llama_model_default_params",
    )
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "llama_adapter.py" and any(s in p.read_text() for s in private)
    ]
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
