"""Rolling backups of the history (SQLite's online backup API) and restoring a damaged one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from starling_local.store import backups
from starling_local.store.conversations import ConversationStore, DamagedStoreError
from tests.cli_helpers import assert_one_line_error, starling


def test_a_backup_is_made_on_the_first_start_of_a_day_and_seven_kept(tmp_path: Path) -> None:
    db = tmp_path / "starling.db"
    store = ConversationStore(db)
    store.create(title="kept")
    store.close()
    assert len(backups.backups(db)) == 1  # the first start of the day made one
    ConversationStore(db).close()
    assert len(backups.backups(db)) == 1  # not twice a day
    for i in range(9):  # older days' backups, as if made on other days
        (backups.backup_folder(db) / f"starling-2026010{i}-120000.db").write_bytes(b"x")
    backups.make_backup(db)
    found = backups.backups(db)
    assert len(found) == backups.KEEP and found[0].made.year == 2026
    restored = ConversationStore(found[0].path)
    assert [c.title for c in restored.conversations()] == ["kept"]
    restored.close()


def test_backups_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STARLING_BACKUPS", "0")
    ConversationStore(tmp_path / "starling.db").close()
    assert backups.backups(tmp_path / "starling.db") == []


def _damage(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for offset in range(4096, len(data), 4096):
        data[offset : offset + 64] = os.urandom(64)
    db.write_bytes(data)
    for side in ("-wal", "-shm"):
        db.with_name(db.name + side).unlink(missing_ok=True)


def test_a_damaged_history_says_so_everywhere_and_is_restored(
    tiny_q4: Path, tmp_path: Path
) -> None:
    r = starling("ask", "-m", tiny_q4, "Keep me safe", "--max-tokens", "3", home=tmp_path)
    assert r.returncode == 0, r.stderr
    db = tmp_path / "data" / "starling.db"
    # The day's automatic backup came before this conversation (at the command's start).
    assert starling("history", "backup", home=tmp_path).returncode == 0
    _damage(db)
    for args in (("history", "show", "1"), ("history", "search", "safe"), ("history", "rm", "1"),
                 ("history", "list"), ("ask", "-m", tiny_q4, "--continue", "x")):  # fmt: skip
        assert_one_line_error(starling(*args, home=tmp_path), 1, "starling history restore")
    listed = starling("history", "backups", home=tmp_path)
    assert listed.returncode == 0 and "starling-" in listed.stdout
    done = starling("history", "restore", home=tmp_path)
    assert done.returncode == 0 and "restored" in done.stdout, done.stderr
    aside = [p for p in db.parent.iterdir() if p.name.startswith("starling.db.damaged-")]
    aside = [p for p in aside if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1  # the damaged file is kept, never deleted
    shown = starling("history", "show", "1", home=tmp_path)
    assert shown.returncode == 0 and "Keep me safe" in shown.stdout
    db.write_bytes(b"")  # truncated to nothing: not silently an empty history
    with pytest.raises(DamagedStoreError, match="0 bytes"):
        ConversationStore(db)
    assert_one_line_error(
        starling("history", "restore", tmp_path / "nope.db", home=tmp_path), 2, "no such backup"
    )
