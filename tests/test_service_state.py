"""The service's crash memory: the answered log stays bounded and survives a torn last line; the registration
journal hands back, at the next start, what the previous run left unfinished."""

from __future__ import annotations

from pathlib import Path

from markerless.service.state import (
    ANSWERED_FILE,
    AnsweredLog,
    JournalEntry,
    RegistrationJournal,
    client_state_dir,
)


def test_answered_log_is_bounded_compacted_and_survives_a_torn_line(tmp_path: Path) -> None:
    log = AnsweredLog(tmp_path, keep=10)
    for i in range(35):
        log.add(("cam", f"d{i}"))
    log.close()
    lines = (tmp_path / ANSWERED_FILE).read_bytes().splitlines()
    assert len(lines) <= 20  # compacted whenever it passes twice `keep`
    with open(tmp_path / ANSWERED_FILE, "ab") as f:
        f.write(b'["cam", "d3')  # a crash mid-write
    again = AnsweredLog(tmp_path, keep=10)
    assert all(("cam", f"d{i}") in again for i in range(25, 35))
    assert ("cam", "d24") not in again and ("cam", "d3") not in again
    again.add(("cam", "new"))
    again.close()
    assert ("cam", "new") in AnsweredLog(tmp_path, keep=10)


def test_journal_reports_the_previous_runs_unfinished_registrations_once(tmp_path: Path) -> None:
    first = RegistrationJournal(tmp_path)
    assert first.interrupted == []
    first.add(JournalEntry("j1", "s1", "reg-1"))
    first.add(JournalEntry("j2", "s2", None))
    first.remove("j2")  # finished
    second = RegistrationJournal(tmp_path)  # the process died with j1 open
    assert second.interrupted == [JournalEntry("j1", "s1", "reg-1")]
    second.remove("j1")  # reported
    assert RegistrationJournal(tmp_path).interrupted == []


def test_client_ids_become_safe_folder_names(tmp_path: Path) -> None:
    assert client_state_dir(tmp_path, "markerless") == tmp_path / "markerless"
    assert client_state_dir(tmp_path, "../a/b c") == tmp_path / "_a_b_c"
