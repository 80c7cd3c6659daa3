"""GGUF checks and repair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starling_local.engine.runtime import Engine
from starling_local.gguf.edit import rewrite_metadata
from starling_local.gguf.info import GGUFError, check_runnable, read_gguf
from tests.cli_helpers import assert_one_line_error, starling


def test_inspect_flags_known_bad_file(eager_eos2_gguf: Path) -> None:
    r = starling("inspect", eager_eos2_gguf, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["eos_id"] == 2 and report["chat_template"] is False
    assert not report["ok"]
    assert any("eos token is 2" in p for p in report["problems"])
    assert any("no chat template" in p for p in report["problems"])


def test_fix_writes_a_correct_copy(eager_eos2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.gguf"
    r = starling("inspect", eager_eos2_gguf, "--fix", out)
    assert r.returncode == 0, r.stderr
    info = read_gguf(out)
    assert info.problems() == [] and info.eos_id == 32000 and info.template_ok
    assert read_gguf(eager_eos2_gguf).eos_id == 2  # the original is untouched
    # The tensors are byte-identical: the same reply, greedy, from both files.
    replies = []
    for path in (eager_eos2_gguf, out):
        eng = Engine(path, n_ctx=256)
        from starling_local.chat.template import Message
        from starling_local.engine.types import SamplingParams
        from tests.prompting import generate

        reply = generate(eng, [Message("user", "Hi")], params=SamplingParams(temperature=0))
        replies.append(reply.stream.consume())
        eng.close()
    assert replies[0] == replies[1]


def test_fix_marks_end_of_turn_control(tiny_f16: Path, tmp_path: Path) -> None:
    from starling_local.gguf.header import read_header

    types = list(read_header(tiny_f16).fields["tokenizer.ggml.token_type"])
    types[32000] = 4  # USER_DEFINED, as some converters write it
    bad = rewrite_metadata(tiny_f16, tmp_path / "ud.gguf", {"tokenizer.ggml.token_type": types})
    assert any("not CONTROL" in p for p in read_gguf(bad).problems())
    r = starling("inspect", bad, "--fix", tmp_path / "ok.gguf")
    assert r.returncode == 0, r.stderr
    assert read_gguf(tmp_path / "ok.gguf").end_of_turn_is_control


def test_other_architecture_refused(tiny_f16: Path, tmp_path: Path) -> None:
    other = rewrite_metadata(tiny_f16, tmp_path / "g.gguf", {"general.architecture": "gemma"})
    with pytest.raises(GGUFError, match="architecture 'gemma' is not supported"):
        check_runnable(other)
    assert_one_line_error(starling("ask", "hi", "--model", other), 1, "not supported")


def test_inspect_bad_files(tmp_path: Path, tiny_q4: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line_error(starling("inspect", junk), 1, "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_q4.read_bytes()[:-1000])
    assert_one_line_error(starling("inspect", cut), 1, "truncated GGUF")
