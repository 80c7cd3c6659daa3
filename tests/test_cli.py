"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.cards import CARD_SINGLE
from tests.cli_helpers import assert_one_line_error, starling


def test_ask_json(tiny_q4: Path, starling_home: Path) -> None:
    r = starling(
        "ask",
        "Hello",
        "--model",
        tiny_q4,
        "--json",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        home=starling_home,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {
        "reply",
        "stop_reason",
        "prompt_tokens",
        "completion_tokens",
        "ttft_s",
        "decode_tokens_per_s",
    }
    assert out["stop_reason"] == "length"
    assert out["prompt_tokens"] == 17 and out["completion_tokens"] == 8
    assert r.stderr == ""  # llama.cpp's log went to the log file
    assert (starling_home / "logs" / "llama.log").stat().st_size > 0


def test_ask_reads_stdin_and_streams_text(eager_gguf: Path, starling_home: Path) -> None:
    r = starling(
        "ask", "--model", eager_gguf, "--temperature", "0", stdin="Hello\n", home=starling_home
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "<|end_of_turn|>" not in r.stdout
    j = starling(
        "ask",
        "-",
        "--model",
        eager_gguf,
        "--temperature",
        "0",
        "--json",
        stdin="Hello",
        home=starling_home,
    )
    out = json.loads(j.stdout)
    assert out["stop_reason"] == "end_of_turn"
    assert out["reply"] == r.stdout.strip()


def test_ask_with_system_and_code_mode(tiny_q4: Path, starling_home: Path) -> None:
    style = ("--mode", "code", "--system", "Be terse")
    r = starling(
        "ask", "Sort a list", "--model", tiny_q4, *style, "--json", "--max-tokens", "4",
        home=starling_home,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    messages = json.dumps([{"role": "user", "content": "Sort a list"}])
    rendered = starling("render", *style, stdin=messages).stdout
    assert (
        rendered
        == "<s>Be terse<|end_of_turn|>Code User: Sort a list<|end_of_turn|>Code Assistant:\n"
    )
    tokens = json.loads(
        starling("render", "--tokens", "--model", tiny_q4, *style, stdin=messages).stdout
    )
    assert tokens[-3:] == [7596, 21631, 28747]  # Code Assistant:
    assert out["prompt_tokens"] == len(tokens)  # the reply was given exactly that prompt
    plain = json.loads(starling("render", "--tokens", "--model", tiny_q4, stdin=messages).stdout)
    assert len(plain) != len(tokens)
    saved = json.loads(
        starling(
            "history", "export", str(out["conversation_id"]), "--format", "json", home=starling_home
        ).stdout
    )
    assert (saved["mode"], saved["system"]) == ("code", "Be terse")


def _saved_params(cid: int, home: Path) -> dict[str, object]:
    export = starling("history", "export", str(cid), "--format", "json", home=home)
    return dict(json.loads(export.stdout)["params"])


def test_continue_keeps_saved_settings_and_saves_given_ones(
    tiny_q4: Path, starling_home: Path
) -> None:
    def ask(*args: str | Path) -> dict[str, object]:
        r = starling("ask", *args, "--json", home=starling_home)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    first = ask("Hi", "--model", tiny_q4, "--temperature", "0", "--seed", "7", "--max-tokens", "3")
    cid = int(str(first["conversation_id"]))
    assert first["completion_tokens"] == 3
    saved = _saved_params(cid, starling_home)
    assert (saved["temperature"], saved["seed"], saved["max_tokens"]) == (0.0, 7, 3)

    again = ask("More", "--continue")  # no flags: the saved settings apply, and stay
    assert again["conversation_id"] == cid and again["completion_tokens"] == 3
    assert _saved_params(cid, starling_home) == saved

    changed = ask("Longer", "--continue", "--max-tokens", "5", "--mode", "code")
    assert changed["completion_tokens"] == 5  # the flag applied to this reply ...
    after = _saved_params(cid, starling_home)  # ... and was saved; the rest kept
    assert (after["temperature"], after["seed"], after["max_tokens"]) == (0.0, 7, 5)
    export = json.loads(
        starling("history", "export", str(cid), "--format", "json", home=starling_home).stdout
    )
    assert export["mode"] == "code"
    assert "ignore_eos" not in after and "stop_at_end_of_turn" not in after


def test_ask_ctrl_c_stops_cleanly(tiny_q4: Path, starling_home: Path) -> None:
    env = dict(os.environ, STARLING_HOME=str(starling_home))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "starling_local",
            "ask",
            "Go on and on",
            "--model",
            str(tiny_q4),
            "--max-tokens",
            "100000",
            "--temperature",
            "0",
            "--stats",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # the reply has started streaming
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert first and proc.returncode == 130
    assert "Traceback" not in err
    assert "stop: cancelled" in err


def test_render_text_and_tokens(tiny_f16: Path) -> None:
    messages = json.dumps([{"role": "user", "content": "Hello"}])
    r = starling("render", stdin=messages)
    assert r.returncode == 0
    assert r.stdout == "<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:\n"
    t = starling("render", "--tokens", "--model", tiny_f16, stdin=messages)
    assert t.returncode == 0, t.stderr
    assert json.loads(t.stdout) == CARD_SINGLE


def test_render_rejects_bad_json() -> None:
    assert_one_line_error(starling("render", stdin="{nope"), 2, "not JSON")
    assert_one_line_error(
        starling("render", stdin='[{"role": "robot", "content": "x"}]'), 2, "role must be"
    )


def test_doctor_json() -> None:
    r = starling("doctor", "--json")
    assert r.returncode == 0
    report = json.loads(r.stdout)
    assert report["backend"] in ("CPU", "CUDA", "Metal", "Vulkan", "ROCm", "SYCL", "GPU")
    assert report["physical_cores"] >= 1
    assert report["free_disk_bytes"] > 0
    assert set(report["paths"]) == {"data", "cache", "config", "logs", "models"}
    if report["backend"] == "CPU":
        assert "CMAKE_ARGS" in report["hint"]


def test_convert_and_quantize_commands(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    r = starling("convert", tiny_checkpoint, "--out", out, "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"tiny-starling:Q8_0\t{out.resolve()}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # intermediate removed
    kept = tmp_path / "k.gguf"
    r = starling("convert", tiny_checkpoint, "--out", kept, "--quant", "Q4_0", "--keep-f16")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k.f16.gguf").exists()
    q = starling("quantize", tmp_path / "k.f16.gguf", tmp_path / "q.gguf", "--quant", "Q5_K_M")
    assert q.returncode == 0, q.stderr
    assert q.stderr == ""  # llama.cpp's quantizer log went to the log file


def test_errors_are_one_line(tmp_path: Path, tiny_q4: Path) -> None:
    missing = tmp_path / "missing.gguf"
    assert_one_line_error(starling("ask", "hi", "--model", missing), 2, "no such model")
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("hello")
    assert_one_line_error(starling("ask", "hi", "--model", notgguf), 1, "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_q4.read_bytes()[:300_000])
    assert_one_line_error(starling("ask", "hi", "--model", cut), 1, "truncated")
    assert_one_line_error(
        starling("quantize", tiny_q4, tmp_path / "x.gguf", "--quant", "Q3_X"),
        2,
        "unknown quantization",
    )
    assert_one_line_error(
        starling("convert", tmp_path, "--out", tmp_path / "y.gguf"), 1, "config.json"
    )
    assert_one_line_error(starling("ask", "hi"), 2, "no model yet: run `starling pull`")
    assert_one_line_error(starling("ask", "  ", "--model", tiny_q4), 2, "empty")


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys, starling_local.cli as c\n"
        "heavy = {'llama_cpp', 'textual', 'huggingface_hub', 'gguf', 'numpy'} & set(sys.modules)\n"
        "print(sorted(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_ask_saves_and_continues(tiny_q4: Path, starling_home: Path) -> None:
    first = starling(
        "ask",
        "Hello llamas",
        "--model",
        tiny_q4,
        "--json",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        home=starling_home,
    )
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    cid = one["conversation_id"]
    assert isinstance(cid, int)
    second = starling(
        "ask",
        "And camels?",
        "--continue",
        "--json",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        home=starling_home,
    )
    assert second.returncode == 0, second.stderr  # the conversation remembers its model
    two = json.loads(second.stdout)
    assert two["conversation_id"] == cid
    # Turn 2's prompt holds turn 1 (17 + 2 tokens for "Hello llamas", the reply, the new turn).
    assert two["prompt_tokens"] > one["prompt_tokens"] + 4
    # ... but this new process evaluated only the new turn: turn 1 came from the saved KV cache.
    assert two["prompt_evaluated"] <= two["prompt_tokens"] - one["prompt_tokens"]
    third = starling(
        "ask",
        "Once more",
        "--conversation",
        str(cid),
        "--model",
        tiny_q4,
        "--json",
        "--max-tokens",
        "2",
        home=starling_home,
    )
    assert json.loads(third.stdout)["conversation_id"] == cid
    listed = json.loads(starling("history", "list", "--json", home=starling_home).stdout)
    assert [(c["id"], c["title"]) for c in listed] == [(cid, "Hello llamas")]
    assert set(listed[0]) >= {"id", "title", "updated"}
    export = json.loads(
        starling("history", "export", str(cid), "--format", "json", home=starling_home).stdout
    )
    assert [m["role"] for m in export["messages"]] == ["user", "assistant"] * 3
    assert export["messages"][1]["content"] == one["reply"]
    nosave = starling(
        "ask",
        "secret",
        "--model",
        tiny_q4,
        "--no-save",
        "--json",
        "--max-tokens",
        "2",
        home=starling_home,
    )
    assert json.loads(nosave.stdout)["conversation_id"] is None
    assert len(json.loads(starling("history", "list", "--json", home=starling_home).stdout)) == 1


def test_history_commands(tiny_q4: Path, starling_home: Path, tmp_path: Path) -> None:
    starling(
        "ask", "Tell me about alpacas", "--model", tiny_q4, "--max-tokens", "2", home=starling_home
    )
    found = json.loads(starling("history", "search", "alpaca", "--json", home=starling_home).stdout)
    assert len(found) == 1 and "alpacas" in found[0]["snippet"]
    cid = found[0]["id"]
    md = starling("history", "export", str(cid), "--format", "md", home=starling_home).stdout
    assert md.startswith("# Tell me about alpacas") and "## You" in md
    out = tmp_path / "c.json"
    starling("history", "export", str(cid), "--format", "json", "-o", out, home=starling_home)
    imported = starling("history", "import", out, home=starling_home)
    assert imported.returncode == 0 and "imported as conversation" in imported.stdout
    assert list(starling_home.glob(f"cache/kv/*/conversation-{cid}.kv"))
    assert starling("history", "rm", str(cid), home=starling_home).returncode == 0
    assert not list(starling_home.glob(f"cache/kv/*/conversation-{cid}.kv"))
    assert_one_line_error(
        starling("history", "show", str(cid), home=starling_home), 2, "no conversation"
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(starling("history", "import", bad, home=starling_home), 2, "not a JSON")


def test_convert_to_several_quants(
    tiny_checkpoint: Path, tmp_path: Path, starling_home: Path
) -> None:
    r = starling(
        "convert",
        tiny_checkpoint,
        "--quant",
        "Q4_0",
        "Q8_0",
        "--out-dir",
        tmp_path,
        home=starling_home,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny-starling-q4_0.gguf",
        "tiny-starling-q8_0.gguf",
    ]  # converted once; the F16 intermediate is gone
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == [
        "tiny-starling:Q4_0",
        "tiny-starling:Q8_0",
    ]
    listed = json.loads(starling("models", "--json", home=starling_home).stdout)
    assert sorted(m["name"] for m in listed) == ["tiny-starling:Q4_0", "tiny-starling:Q8_0"]
    assert {m["source"] for m in listed} == {"converted"}
    assert_one_line_error(
        starling(
            "convert", tiny_checkpoint, "--quant", "Q4_0", "Q8_0", "--out", tmp_path / "x.gguf"
        ),
        2,
        "--out names one file",
    )


def test_bench_runs_end_to_end(tiny_q4: Path, tmp_path: Path, starling_home: Path) -> None:
    out = tmp_path / "bench.json"
    r = starling(
        "bench",
        "--model",
        tiny_q4,
        "--tokens",
        "16",
        "--turns",
        "3",
        "--resume-tokens",
        "300",
        "--branch-tokens",
        "300",
        "--tui-tokens",
        "40",
        "--serve-tokens",
        "16",
        "--grammar-tokens",
        "24",
        "--json",
        out,
        home=starling_home,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    f = json.loads(out.read_text())
    assert f["decode"]["raw_tokens_per_s"] > 0 and f["decode"]["starling_tokens_per_s"] > 0
    turns = f["multi_turn"]
    assert len(turns) == 3
    # Only the new turn is evaluated: the turn's new tokens plus the last reply token.
    assert all(t["prompt_evaluated"] <= t["new_tokens"] + 1 for t in turns[1:])
    resume = f["resume"]
    assert resume["reopened_with_cache"]["prompt_evaluated"] < 40
    assert resume["reopened_without_cache"]["prompt_evaluated"] == resume["conversation_tokens"]
    live = resume["live_with_state_file"]
    assert live["state_bytes_read"] == 0 and live["before_state_bytes_read"] > 0
    assert live["prompt_evaluated"] < 40
    branch = f["branch"]
    # A branch's first reply evaluates only its new turn, from the parent's live or saved KV.
    assert branch["parent_tokens"] > 250
    for key in ("parent_next", "branch_first", "branch_from_saved_state"):
        assert branch[key]["prompt_evaluated"] < 40, (key, branch[key])
    cold = branch["branch_without_kv"]
    assert (
        cold["prompt_evaluated"] == cold["prompt_tokens"] == branch["branch_first"]["prompt_tokens"]
    )
    for shape in f["tui"].values():
        assert shape["reply_tokens"] == 40 and shape["rendered_chars"] == shape["reply_chars"]
        assert shape["redraws"] >= 1 and shape["ratio_to_ask"] > 0
    head = f["tui"]["markdown"]["reply_head"]
    assert head.startswith("## 1. Caching\n\nWhen you add **caching**")
    serve = f["serve"]
    assert serve["http_tokens_per_s"] > 0 and serve["ratio"] > 0
    later = [row for row in serve["alternating"] if row["turn"] > 1]
    assert len(later) == 8 and all(row["prompt_tokens"] > 100 for row in later)
    # Each client's history came from the KV cache though the other client ran in between:
    # only the new turn (its ~55 tokens, plus the reply's end-of-turn) is evaluated.
    assert all(row["evaluated"] < 64 for row in later), later
    assert later[-1]["prompt_tokens"] > 250
    grammar = f["grammar"]
    assert grammar["grammar_tokens_per_s"] > 0 and grammar["ratio"] > 0
    assert "raw llama.cpp" in r.stdout and "resume" in r.stdout and "alternating" in r.stdout
    assert "JSON-schema grammar" in r.stdout
    assert "branch a" in r.stdout


def test_chat_with_a_conversation_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    r = starling("chat", "--conversation", "999", home=tmp_path)
    assert_one_line_error(r, 2, "no conversation 999")
