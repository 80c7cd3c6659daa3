"""The README's benchmark tables are the ones `scripts/readme_tables.py` makes from
`bench-results/`: a table edited by hand, or a bench result saved without running the script,
fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_tables.py"


def test_the_benchmark_tables_are_made_from_bench_results() -> None:
    spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    _, stale = tables.render(tables.README.read_text(encoding="utf-8"))
    assert stale == [], f"run python scripts/readme_tables.py: {stale} differ"
