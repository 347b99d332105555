"""`mlkit.ledger`: the audit ledger is written one way (`record`), survives a torn write, shows an edit or a gap, and
keeps one chain when several processes append at once."""
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from mlkit.config import load_settings
from mlkit.ledger import history, read_ledger, record, verify_ledger


def _settings(tmp_path: Path):
    (tmp_path / "settings.ini").write_text("[project]\nstate_dir = state\n")
    return load_settings(tmp_path / "settings.ini", env={})


def test_records_chain_and_read_back_per_model(tmp_path):
    s = _settings(tmp_path)
    a = record("register", "m", alias="challenger", to_version="1", reason="run r1", settings=s)
    b = record("deploy", "other", alias="serving", to_version="3", settings=s)
    c = record("promote", "m", alias="champion", to_version="1", settings=s, gate={"passed": True, "checks": []})
    assert [r["seq"] for r in (a, b, c)] == [1, 2, 3] and b["prev"] == a["hash"] and c["prev"] == b["hash"]
    assert [r["action"] for r in history("m", s)] == ["register", "promote"]
    assert history("m", s)[1]["gate"] == {"passed": True, "checks": []} and verify_ledger(s.ledger_path) == []
    assert {"time", "who", "model", "action", "alias", "from_version", "to_version", "reason"} <= set(a)


def test_a_torn_write_is_skipped_and_the_next_record_starts_fresh(tmp_path):
    s = _settings(tmp_path)
    record("register", "m", to_version="1", settings=s)
    with open(s.ledger_path, "ab") as f: f.write(b'{"seq": 2, "model": "m", "act')  # a crash mid-write
    r = record("promote", "m", to_version="1", settings=s)
    assert r["seq"] == 2 and [x["action"] for x in read_ledger(s.ledger_path)] == ["register", "promote"]
    assert verify_ledger(s.ledger_path) == []


def test_an_edit_and_a_gap_show(tmp_path):
    s = _settings(tmp_path)
    for v in "123": record("register", "m", to_version=v, settings=s)
    lines = s.ledger_path.read_text().splitlines()
    s.ledger_path.write_text("\n".join([lines[0], lines[1].replace('"to_version":"2"', '"to_version":"9"'), lines[2]]) + "\n")
    assert verify_ledger(s.ledger_path) == ["record 2: hash mismatch (edited)"]
    s.ledger_path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert verify_ledger(s.ledger_path) == ["record 3: chain broken (a record before it is missing or edited)"]


def test_concurrent_writers_keep_one_chain(tmp_path):
    s = _settings(tmp_path)
    code = ("import sys; from mlkit.config import load_settings; from mlkit.ledger import record\n"
            "s = load_settings(sys.argv[1], env={})\n"
            "for i in range(25): record('deploy', sys.argv[2], to_version=str(i), settings=s)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "settings.ini"), f"m{k}"]) for k in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    recs = read_ledger(s.ledger_path)
    assert [r["seq"] for r in recs] == list(range(1, 101)) and verify_ledger(s.ledger_path) == []
    assert all(len(history(f"m{k}", s)) == 25 for k in range(4))


def test_every_module_writes_the_ledger_through_record():
    writers = [p.name for p in (REPO / "mlkit").glob("*.py") if p.name not in ("ledger.py", "_modidx.py") and "append_ledger(" in p.read_text()]
    assert not writers, f"these write ledger records their own way: {writers}"
