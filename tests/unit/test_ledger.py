"""SeenLog (issue 8 #7): what survives a restart, bounded, torn lines skipped, 0600."""

from __future__ import annotations

from pathlib import Path

from agent import ledger
from agent.ledger import SeenLog


def test_f07_seen_log_keeps_live_ids_across_reopen(tmp_path: Path):
    now = [1000.0]
    path = tmp_path / "seen"
    log = SeenLog(path, clock=lambda: now[0])
    assert log.load() == []
    log.record("a", 1100.0)
    log.record("b", 1010.0)
    log.close()
    with open(path, "ab") as f:
        f.write(b'["torn", 12')  # power lost mid-write
    now[0] = 1050.0
    log = SeenLog(path, clock=lambda: now[0])
    assert log.load() == [("a", 1100.0)]  # b expired, the torn line skipped
    assert path.stat().st_mode & 0o777 == 0o600
    log.close()


def test_f07_seen_log_is_bounded_by_the_live_ids(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ledger, "_COMPACT_SLACK", 10)
    now = [0.0]
    path = tmp_path / "seen"
    log = SeenLog(path, clock=lambda: now[0])
    log.load()
    for i in range(200):
        now[0] = float(i)
        log.record(f"id{i}", i + 5.0)  # each id lives 5 s
    lines = path.read_bytes().count(b"\n")
    assert lines <= 2 * 6 + 10 + 1, lines  # twice the live ids plus the slack, not 200
    log.close()
    assert {cid for cid, _ in SeenLog(path, clock=lambda: now[0]).load()} >= {"id199", "id195"}


def test_seen_log_first_start_syncs_its_directory_with_the_first_record(
    tmp_path: Path, monkeypatch
):
    """A first start rewrites nothing (no fsync on the way up); the new log's directory
    entry is made durable with the first record, once, before record() returns."""
    synced: list[Path] = []
    monkeypatch.setattr(ledger, "fsync_dir", synced.append)
    path = tmp_path / "seen"
    log = SeenLog(path, clock=lambda: 0.0)
    assert log.load() == []
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    assert synced == []
    log.record("a", 10.0)
    assert synced == [tmp_path]
    log.record("b", 10.0)
    assert synced == [tmp_path]  # once
    log.close()
    assert [cid for cid, _ in SeenLog(path, clock=lambda: 0.0).load()] == ["a", "b"]
