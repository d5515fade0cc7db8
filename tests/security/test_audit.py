"""Audit logs: a hash chain that shows an edited, deleted, reordered or cut-off line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare_async.cli._main import main
from flare_async.security import GENESIS, AuditLog, verify_audit


def write_log(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append("job-submitted", now=1000.0 + i, job=f"j{i}", by="alice@example.org")
    return log


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_a_clean_log_verifies_and_continues_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = write_log(path, 3)
    report = verify_audit(lines(path))
    assert (report.ok, report.entries, report.head) == (True, 3, log.head)
    again = AuditLog(path)  # a restarted process continues the chain
    again.append("job-aborted", now=2000.0, job="j1", by="bob")
    report = verify_audit(lines(path))
    assert (report.ok, report.entries) == (True, 4)
    assert json.loads(lines(path)[-1])["seq"] == 3
    assert verify_audit([]).head == GENESIS


@pytest.mark.parametrize("damage", ["edit", "delete", "reorder", "garbage"])
def test_damage_is_found_at_its_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    text = lines(path)
    if damage == "edit":
        text[2] = text[2].replace("alice@example.org", "mallory@example.org")
    elif damage == "delete":
        del text[2]
    elif damage == "reorder":
        text[1], text[2] = text[2], text[1]
    else:
        text[2] = "not json\n"
    path.write_text("".join(text))
    report = verify_audit(lines(path))
    assert not report.ok
    assert report.bad_line == (3 if damage != "reorder" else 2)
    assert report.entries == report.bad_line - 1
    with pytest.raises(ValueError, match=f"line {report.bad_line}"):
        AuditLog(path)  # nothing is appended to a broken chain


def test_a_recomputed_hash_still_breaks_the_chain(tmp_path: Path) -> None:
    # An editor who recomputes the edited line's own hash breaks the next line's link.
    import hashlib  # noqa: PLC0415

    path = tmp_path / "audit.jsonl"
    write_log(path)
    text = lines(path)
    record = json.loads(text[1])
    record.pop("hash")
    record["by"] = "mallory"
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    record["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    text[1] = json.dumps(record) + "\n"
    report = verify_audit(text)
    assert (report.ok, report.bad_line) == (False, 3)


def test_the_cli_verifies_and_needs_the_head_to_see_a_cut_off_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    log = write_log(path)
    assert main(["audit", "verify", str(path)]) == 0
    assert f"ok: 5 entries, head {log.head}" in capsys.readouterr().out
    path.write_text("".join(lines(path)[:-1]))  # the last line cut off: the chain still holds
    assert main(["audit", "verify", str(path)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", str(path), "--head", log.head]) == 1
    assert "cut off" in capsys.readouterr().out
    text = lines(path)
    path.write_text(text[0] + text[2] + text[3])
    assert main(["audit", "verify", str(path)]) == 1
    assert "BAD" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("key", "forged"),
    [("by", '"mallory"'), ("event", '"job-aborted"'), ("seq", "7")],
)
def test_a_duplicate_key_before_the_real_one_is_refused_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, forged: str
) -> None:
    """``{"by": "mallory", ..., "by": "alice"}`` parses (last key wins) to the record that was
    hashed, so its hash holds; a reader that keeps the first key sees mallory. The line as
    written is not the line that was hashed: refused, with its number."""
    path = tmp_path / "audit.jsonl"
    write_log(path)
    text = lines(path)
    text[2] = "{" + f'"{key}": {forged}, ' + text[2][1:]
    assert json.loads(text[2]) == json.loads(lines(path)[2])  # the parsed record is unchanged
    path.write_text("".join(text))
    report = verify_audit(lines(path))
    assert (report.ok, report.entries, report.bad_line) == (False, 2, 3)
    assert f"duplicate key {key!r}" in report.reason
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"BAD: {path}: line 3: duplicate key {key!r}")
    with pytest.raises(ValueError, match="line 3"):
        AuditLog(path)  # nor is such a log continued


def test_a_duplicate_key_inside_a_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("admin-command", now=1.0, admin="alice", detail={"command": "list"})
    text = lines(path)
    text[0] = text[0].replace('{"command": "list"}', '{"command": "abort", "command": "list"}')
    report = verify_audit(text)
    assert (report.ok, report.bad_line) == (False, 1)
    assert "duplicate key 'command'" in report.reason
