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


# --- restoring never hides the history ------------------------------------------------------


def _history(tmp_path: Path, title: str) -> Path:
    db = tmp_path / "data" / "starling.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    store = ConversationStore(db)
    store.create(title=title)
    store.close()
    return db


def _titles(db: Path) -> list[str]:
    store = ConversationStore(db)
    try:
        return [c.title for c in store.conversations()]
    finally:
        store.close()


def test_a_file_that_is_no_history_is_refused_and_the_history_stays(tmp_path: Path) -> None:
    import sqlite3

    db = _history(tmp_path, "mine")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE notes (body TEXT)")
    newer = tmp_path / "newer.db"
    backups.make_backup(db)
    newer.write_bytes(backups.backups(db)[0].path.read_bytes())
    with sqlite3.connect(newer) as con:
        con.execute("INSERT INTO migrations VALUES ('m999_future', 'x')")
    for path, words in ((empty, "empty (0 bytes)"), (foreign, "not a starling-local history"),
                        (newer, "a newer starling-local")):  # fmt: skip
        r = starling("history", "restore", path, home=tmp_path)
        assert_one_line_error(r, 2, words)
        assert _titles(db) == ["mine"]  # untouched, nothing moved aside
    assert not [p for p in db.parent.iterdir() if ".damaged-" in p.name]


def test_restore_falls_back_to_the_newest_good_backup_and_says_which(tmp_path: Path) -> None:
    db = _history(tmp_path, "good")
    good = backups.make_backup(db)
    bad = good.with_name("starling-29990101-000000.db")  # the newest, and damaged
    bad.write_bytes(good.read_bytes())
    _damage(bad)
    r = starling("history", "restore", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert good.name in r.stdout and bad.name in r.stderr and "damaged" in r.stderr
    assert _titles(db) == ["good"]


def test_a_damaged_history_is_not_backed_up_over_good_copies(tmp_path: Path) -> None:
    db = _history(tmp_path, "good")
    before = [b.path for b in backups.backups(db)]
    _damage(db)
    with pytest.raises(backups.BackupError, match="damaged"):
        backups.make_backup(db)
    assert [b.path for b in backups.backups(db)] == before


def test_restore_refuses_while_another_process_has_the_history_open(tmp_path: Path) -> None:
    import subprocess
    import sys

    db = _history(tmp_path, "open")
    backups.make_backup(db)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import sqlite3, sys, time; c = sqlite3.connect({str(db)!r}); "
         "c.execute('SELECT 1 FROM conversations').fetchall(); print('open', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        r = starling("history", "restore", home=tmp_path)
        assert_one_line_error(r, 2, f"open in another process ({holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert starling("history", "restore", home=tmp_path).returncode == 0


def test_a_restore_that_cannot_finish_leaves_the_history_in_place(tmp_path: Path) -> None:
    """A disk too full for the copy: the history is where it was, with every conversation,
    and the error names the cause."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home / "data")],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        db = _history(home, "precious")
        big = tmp_path / "big.db"  # a good backup larger than the space left
        store = ConversationStore(big)
        conv = store.create(title="big")
        for i in range(40):
            store.add_message(conv.id, "user", "x" * 20000 + str(i))
        store.close()
        done = starling("history", "restore", big, home=home)
        assert done.returncode != 0 and "unchanged" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert _titles(db) == ["precious"]
    finally:
        subprocess.run(["umount", "-l", str(home / "data")], check=False)
