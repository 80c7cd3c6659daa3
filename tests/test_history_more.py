"""Imports (ChatGPT exports, message lists), branches, and files in prompts, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starling_local.store.conversations import ConversationStore
from tests.cli_helpers import assert_one_line_error, starling


def node(
    node_id: str, parent: str | None, children: list[str], role: str | None = None, **extra: Any
) -> dict[str, Any]:
    message = None
    if role is not None:
        message = {
            "id": node_id,
            "author": {"role": role},
            "create_time": extra.get("time", 1700000000.0),
            "content": extra.get("content")
            or {"content_type": "text", "parts": [extra.get("text", "")]},
            "metadata": extra.get("metadata", {}),
        }
    return {"id": node_id, "message": message, "parent": parent, "children": children}


def chatgpt_export() -> list[dict[str, Any]]:
    """Written from the format's documented shape: a tree of nodes, `current_node` the leaf the
    user last saw. The first answer was regenerated: its old version is another branch."""
    mapping = {
        "root": node("root", None, ["sys"]),
        "sys": node(
            "sys",
            "root",
            ["u1"],
            "system",
            text="",
            metadata={"is_visually_hidden_from_conversation": True},
        ),
        "u1": node("u1", "sys", ["a1-old", "a1"], "user", text="Hi there"),
        "a1-old": node("a1-old", "u1", [], "assistant", text="An answer nobody kept."),
        "a1": node("a1", "u1", ["u2"], "assistant", text="Hello! How can I help?"),
        "u2": node("u2", "a1", ["img", "a2"], "user", text="Tell me a joke"),
        "img": node(
            "img",
            "u2",
            [],
            "assistant",
            content={"content_type": "multimodal_text", "parts": [{"asset": "x"}]},
        ),
        "a2": node(
            "a2", "u2", [], "assistant", text="Why did the llama cross the road?", time=1700000100.0
        ),
    }
    second = {
        "root": node("root", None, ["q"]),
        "q": node("q", "root", ["r"], "user", text="2+2?"),
        "r": node("r", "q", [], "assistant", text="4"),
    }
    return [
        {
            "title": "Greetings",
            "create_time": 1700000000.0,
            "update_time": 1700000100.0,
            "mapping": mapping,
            "current_node": "a2",
        },
        {
            "title": "Maths",
            "create_time": 1700000500.0,
            "update_time": 1700000600.0,
            "mapping": second,
            "current_node": "r",
        },
    ]


def test_chatgpt_export_imports_the_branch_the_user_last_saw(
    tmp_path: Path, starling_home: Path
) -> None:
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(chatgpt_export()))
    r = starling("history", "import", path, home=starling_home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("imported as conversation") == 2
    store = ConversationStore(starling_home / "data" / "starling.db")
    greetings = next(c for c in store.conversations() if c.title == "Greetings")
    messages = store.get(greetings.id).messages
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Hi there"),
        ("assistant", "Hello! How can I help?"),  # not the answer on the other branch
        ("user", "Tell me a joke"),
        ("assistant", "Why did the llama cross the road?"),  # not the image-only sibling
    ]
    assert greetings.created.startswith("2023-11-14T22:13:20")
    assert messages[-1].created.startswith("2023-11-14T22:15:00")


def test_message_lists_import_and_bad_files_import_nothing(
    tmp_path: Path, starling_home: Path
) -> None:
    plain = tmp_path / "messages.json"
    plain.write_text(
        json.dumps(
            [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!"},
            ]
        )
    )
    r = starling("history", "import", plain, home=starling_home)
    assert r.returncode == 0, r.stderr
    store = ConversationStore(starling_home / "data" / "starling.db")
    [conv] = store.conversations()
    assert store.get(conv.id).system == "Be kind." and conv.title == "Hello"

    broken = chatgpt_export()
    broken[1]["current_node"] = "missing"  # the second conversation is damaged
    for name, content, message in [
        ("half.json", json.dumps(broken), "conversation 1"),
        ("bad.json", "{not json", "not a JSON export"),
        ("other.json", json.dumps({"hello": "world"}), "not a conversation file"),
    ]:
        path = tmp_path / name
        path.write_text(content)
        assert_one_line_error(starling("history", "import", path, home=starling_home), 2, message)
    assert len(store.conversations()) == 1  # nothing half-imported


def test_fork_starts_from_the_parents_cache(tiny_q4: Path, starling_home: Path) -> None:
    def ask(*args: str | Path) -> dict[str, Any]:
        r = starling(
            "ask", *args, "--json", "--temperature", "0", "--max-tokens", "8", home=starling_home
        )
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    first = ask("Tell me a long story about " + "llamas and alpacas " * 20, "--model", tiny_q4)
    cid = first["conversation_id"]
    ask("And then?", "--continue")
    forked = starling("history", "fork", str(cid), "--at", "2", "--json", home=starling_home)
    assert forked.returncode == 0, forked.stderr
    branch = json.loads(forked.stdout)["conversation_id"]
    store = ConversationStore(starling_home / "data" / "starling.db")
    conv = store.get(branch)
    assert conv.parent_id == cid and len(conv.messages) == 2 and conv.title.endswith("(branch)")
    reply = ask("Something else", "--conversation", str(branch))
    # The shared story came from the parent's KV state: only the new turn was evaluated.
    assert reply["prompt_tokens"] > 150 and reply["prompt_evaluated"] < 30
    assert len(store.get(cid).messages) == 4  # the parent is unchanged
    assert_one_line_error(
        starling("history", "fork", str(cid), "--at", "9", home=starling_home), 2, "--at must be"
    )


def test_files_go_into_the_message_as_code_blocks(
    tiny_q4: Path, starling_home: Path, tmp_path: Path
) -> None:
    code = tmp_path / "sort.py"
    code.write_text("def sort(xs):\n    return sorted(xs)\n")
    notes = tmp_path / "notes.md"
    notes.write_text("A fence inside:\n```\nx\n```\n")
    r = starling(
        "ask",
        "Add type hints",
        "--file",
        code,
        "-f",
        notes,
        "--model",
        tiny_q4,
        "--json",
        "--max-tokens",
        "2",
        home=starling_home,
    )
    assert r.returncode == 0, r.stderr
    store = ConversationStore(starling_home / "data" / "starling.db")
    message = store.get(json.loads(r.stdout)["conversation_id"]).messages[0].content
    assert message.startswith("Add type hints\n\n`sort.py`:\n```python\ndef sort(xs):")
    assert "`notes.md`:\n````markdown\nA fence inside:\n```\nx\n```\n````" in message

    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02")
    latin = tmp_path / "old.txt"
    latin.write_bytes("café".encode("latin-1"))
    big = tmp_path / "big.txt"
    big.write_text("llama " * 4000)
    for path, message_part in [
        (binary, "binary"),
        (latin, "not UTF-8"),
        (tmp_path / "no.txt", "no such file"),
    ]:
        assert_one_line_error(
            starling("ask", "x", "--file", path, "--model", tiny_q4, home=starling_home),
            2,
            message_part,
        )
    assert_one_line_error(
        starling(
            "ask", "x", "--file", big, "--model", tiny_q4, "--ctx", "1024", home=starling_home
        ),
        2,
        "do not fit the 1024-token context",
    )
    assert len(store.conversations()) == 1  # nothing saved for the refused ones
