"""schemathesis against OpenAI's own API description, trimmed to the operations `starling
serve` implements (tests/openapi/openai-trimmed.json, made by scripts/trim_openapi.py):
no 5xx, responses that conform to OpenAI's schemas, the content types it documents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_helpers import Served, serve

ROOT = Path(__file__).resolve().parents[1]
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


@pytest.fixture(scope="module")
def server(tiny_q4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tiny_q4, tmp_path_factory.mktemp("openapi"), "--ctx", "2048", "--quiet") as s:
        yield s


@pytest.mark.slow
def test_openai_openapi_description_finds_no_failures(server: Served) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is a test dependency"
    r = subprocess.run(
        [st, "run", str(ROOT / "tests" / "openapi" / "openai-trimmed.json"),
         "--url", server.v1, "--checks", CHECKS, "--max-examples", "25",
         "--generation-deterministic", "--request-timeout", "60",
         "--suppress-health-check", "all"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env=dict(os.environ, SCHEMATHESIS_HOOKS="tests.openapi.hooks", NO_COLOR="1"),
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert " passed" in out and "failed" not in out.split("SUMMARY")[-1], out[-3000:]
    assert server.process.poll() is None  # still serving
