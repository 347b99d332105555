"""`mlkit.ledger` and the registry's moves: a write-ahead audit ledger that shows an edit, a gap, a bad line or a cut
end (its head is anchored in the registry), survives a crash at each named point (the next command finishes or rolls
back the move), and keeps registry and ledger agreeing when several processes promote at once."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, mlkit, project_env

from mlkit.config import load_settings
from mlkit.ledger import LedgerError, alias_state, history, moves, read_ledger, record, verify_ledger

ROUNDS = int(os.environ.get("MLKIT_SOAK_ROUNDS", "3"))  # `make soak` runs the concurrent promotions 20 times


def _settings(tmp_path: Path):
    (tmp_path / "settings.ini").write_text("[project]\nstate_dir = state\n[ledger]\nlock_wait = 120\n")
    return load_settings(tmp_path / "settings.ini", env={})


def test_records_chain_and_read_back_per_model(tmp_path):
    s = _settings(tmp_path)
    a = record("register", "m", alias="challenger", to_version="1", reason="run r1", settings=s)
    b = record("deploy", "other", alias="serving", to_version="3", settings=s)
    c = record("promote", "m", alias="champion", to_version="1", settings=s, gate={"passed": True, "checks": []})
    assert [r["seq"] for r in (a, b, c)] == [1, 2, 3] and b["prev"] == a["hash"] and c["prev"] == b["hash"]
    assert [r["action"] for r in history("m", s)] == ["register", "promote"]
    assert history("m", s)[1]["gate"] == {"passed": True, "checks": []} and verify_ledger(s.ledger_path) == []
    assert {"format", "time", "who", "model", "action", "alias", "from_version", "to_version", "reason"} <= set(a)


def test_a_torn_write_is_cut_by_the_next_writer_and_said(tmp_path):
    "A crash mid-write leaves bytes after the last newline: readers see the records before it, the next append cuts them."
    s = _settings(tmp_path)
    record("register", "m", alias="challenger", to_version="1", settings=s)
    with open(s.ledger_path, "ab") as f: f.write(b'{"seq": 2, "model": "m", "act')  # a crash mid-write
    assert [r["seq"] for r in history("m", s)] == [1]
    r = record("promote", "m", alias="champion", to_version="1", settings=s)
    assert r["seq"] == 2 and r["repaired"].startswith("cut 29 bytes of an unfinished write after record 1")
    assert [x["action"] for x in read_ledger(s.ledger_path)] == ["register", "promote"] and verify_ledger(s.ledger_path) == []


def test_an_edit_a_gap_a_bad_line_and_a_cut_end_stop_every_reader(tmp_path):
    s = _settings(tmp_path)
    for v in "123": record("deploy", "m", alias="serving", to_version=v, settings=s)
    good = s.ledger_path.read_text()
    lines = good.splitlines()
    cases = {
        "edited": ("\n".join([lines[0], lines[1].replace('"reason":""', '"reason":"approved by the board"'), lines[2]]) + "\n",
                   "record 2 (line 2): its hash does not match its content (edited)"),
        "gap": ("\n".join([lines[0], lines[2]]) + "\n", "record 3 (line 2): the chain is broken before it"),
        "garbage": ("\n".join([lines[0], "{not json", lines[1], lines[2]]) + "\n", "line 2: not a ledger record"),
        "cut end": ("\n".join(lines[:2]) + "\n", "the project's anchor names record 3, but the ledger ends at record 2"),
        "swapped": ("\n".join([lines[0], lines[2], lines[1]]) + "\n", "the chain is broken before it"),
    }
    env = project_env(tmp_path / "settings.ini")
    for what, (text, expected) in cases.items():
        s.ledger_path.write_text(text)
        with pytest.raises(LedgerError, match=expected.replace("(", r"\(").replace(")", r"\)")): history("m", s)
        with pytest.raises(LedgerError): record("deploy", "m", alias="serving", to_version="1", settings=s)  # nothing is added to it
        r = mlkit("models", "history", "m", env=env)
        assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)
        v = mlkit("models", "verify", env=env)
        assert v.returncode == 1 and expected in v.stderr, (what, v.stderr)
    s.ledger_path.write_text(good)
    assert history("m", s) and mlkit("models", "verify", env=env).returncode == 0


def test_a_ledger_written_before_format_2_still_reads_and_verifies(tmp_path):
    "The fixture was written by the ledger of commit e558c57 (format 1: no `format` field, a torn write closed mid-file)."
    s = _settings(tmp_path)
    s.ledger_path.parent.mkdir(parents=True)
    s.ledger_path.write_bytes((REPO / "tests" / "fixtures" / "ledger-format1.jsonl").read_bytes())
    assert verify_ledger(s.ledger_path) == []
    assert [(m["action"], m["to_version"]) for m in history("m", s)] == [("register", "1"), ("promote", "1"), ("register", "2")]
    r = record("deploy", "m", alias="serving", to_version="1", settings=s)  # format 2 goes on from it
    assert r["format"] == 2 and r["seq"] == 4 and verify_ledger(s.ledger_path) == []


def test_concurrent_writers_keep_one_chain(tmp_path):
    s = _settings(tmp_path)
    record("deploy", "first", settings=s)  # the MLflow store made once (four processes making it at once race in its migrations)
    code = ("import sys; from mlkit.config import load_settings; from mlkit.ledger import record\n"
            "s = load_settings(sys.argv[1], env={})\n"
            "for i in range(10): record('deploy', sys.argv[2], to_version=str(i), settings=s)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "settings.ini"), f"m{k}"]) for k in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    recs = read_ledger(s.ledger_path)
    assert [r["seq"] for r in recs] == list(range(1, 42)) and verify_ledger(s.ledger_path) == []
    assert all(len(history(f"m{k}", s)) == 10 for k in range(4))


def test_every_module_writes_the_ledger_through_record():
    writers = [p.name for p in (REPO / "mlkit").glob("*.py") if p.name not in ("ledger.py", "_modidx.py") and "append_ledger(" in p.read_text()]
    assert not writers, f"these write ledger records their own way: {writers}"


# --- the registry's moves, with real MLflow, real processes and real SIGKILLs -------------------------------------

MAKE_VERSIONS = """
import sys, tempfile
from pathlib import Path
import mlkit.config
from mlkit.contracts import Contract, validate
from mlkit.data import load_penguins
from mlkit.features import FeatureSpec
from mlkit.models import TabularMLP, bundle_sha256, model_config, save_bundle
from mlkit.registry import register
from mlkit.snapshots import snapshot
from mlkit.tracking import end_run, log_bundle, log_dataset, mlflow, start_run
s = mlkit.config.configure(mlkit.config.load_settings(sys.argv[1]))
df = load_penguins()
contract = Contract.load(sys.argv[2]).subset(["island", "sex"])
spec = FeatureSpec.from_contract(contract).fit(df)
snap = snapshot(df, s.snapshots_dir)
for i in range(int(sys.argv[3])):
    run = start_run("m", params={"i": i}, settings=s)
    log_dataset(snap, df, contract, validate(df, contract), {})
    mlflow(s).log_metrics({"test_accuracy": 0.5 + i / 100})
    mlflow(s).set_tag("mlkit.loadback", "passed")
    cfg = model_config(TabularMLP, n_features=len(spec.output_names), n_classes=3, hidden=[4])
    b = save_bundle(Path(tempfile.mkdtemp()) / "bundle", TabularMLP(**cfg["kwargs"]), cfg, features=spec.to_dict(), contract=contract.to_dict())
    info = log_bundle(b, df.head(2).to_dicts())
    end_run()
    print(register(info.model_uri, "m", run.info.run_id, bundle_sha256(b), settings=s).version, flush=True)
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    "A project with model `m` registered 6 times (pre-built bundles, no training), versions 1 then 2 promoted (forced)."
    root = tmp_path_factory.mktemp("ledger-template")
    ini = root / "settings.ini"
    ini.write_text("[project]\nstate_dir = state\n[ledger]\nlock_wait = 300\n")
    env = project_env(ini)
    code = MAKE_VERSIONS + ("from mlkit.registry import promote\n"
                            "for v in ('1', '2'): promote('m', v, force=True, reason='set up', settings=s)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ini), str(REPO / "nbs/train/penguins.contract.yaml"), "6"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, r.stdout.split()


@pytest.fixture
def versions(template, tmp_path):
    "A copy of the template project (its MLflow store, ledger and anchors; the artifacts stay where the store names them)."
    shutil.copytree(template[0], tmp_path / "p")
    ini = tmp_path / "p" / "settings.ini"
    return {"ini": ini, "env": project_env(ini), "settings": load_settings(ini, env={}), "versions": template[1]}


def _aliases(env) -> dict:
    code = ("import json, mlkit.config; from mlkit.registry import alias_version; mlkit.config.configure()\n"
            "print(json.dumps({a: alias_version('m', a) for a in ('champion', 'challenger')}))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _agree(v: dict):
    "The registry's aliases are where the ledger's moves left them, and each champion move started where the last ended."
    recs = read_ledger(v["settings"].ledger_path)
    state, problems = alias_state(recs)
    assert problems == []
    assert _aliases(v["env"]) == {a: state.get(("m", a)) for a in ("champion", "challenger")}
    champ = [m for m in moves(recs) if m.get("alias") == "champion" and m.get("phase") in (None, "done")]
    for before, after in zip(champ, champ[1:]):
        assert after["from_version"] == before["to_version"] and after.get("judged", after["from_version"]) == before["to_version"]
    assert mlkit("models", "verify", "m", env=v["env"]).returncode == 0
    return recs


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_promotions_serialize_and_agree(versions, round_):
    "4 processes promote 4 versions at once (forced, so every one moves): 4 champion moves, one after the other."
    env, vs = versions["env"], versions["versions"]
    procs = [subprocess.Popen([mlkit_bin(), "models", "promote", "m", v, "--force", "--reason", f"round {round_} p{v}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in vs[2:6]]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-500:] for o in outs]
    recs = _agree(versions)
    champ = [m for m in moves(recs) if m.get("alias") == "champion" and m.get("phase") == "done"][2:]  # after the template's two
    assert sorted(m["to_version"] for m in champ) == sorted(vs[2:6]) and champ[0]["from_version"] == vs[1]
    assert all(m.get("judged") == m["from_version"] for m in champ)  # each gate judged the champion of its moment


def mlkit_bin() -> str: return str(Path(sys.executable).parent / "mlkit")


@pytest.mark.parametrize("point,action", [("intent", "promote"), ("alias", "promote"), ("intent", "rollback"),
                                          ("alias", "rollback"), ("register", "register"), ("alias", "retire")])
def test_a_crash_at_each_point_is_resolved_by_the_next_command(versions, point, action):
    env, vs = versions["env"], versions["versions"]
    before = _aliases(env)
    assert before == {"champion": vs[1], "challenger": vs[5]}
    args = {"promote": ["models", "promote", "m", vs[2], "--force", "--reason", "third"],
            "rollback": ["models", "rollback", "m", "--reason", "back"],
            "retire": ["models", "retire", "m", vs[5], "--reason", "old"]}
    if action == "register":
        r = subprocess.run([sys.executable, "-c", MAKE_VERSIONS, str(versions["ini"]), str(REPO / "nbs/train/penguins.contract.yaml"), "1"],
                           env={**env, "MLKIT_FAULT": point}, capture_output=True, text=True, timeout=600)
    else: r = mlkit(*args[action], env={**env, "MLKIT_FAULT": point})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    hist = json.loads(mlkit("models", "history", "m", "--json", env=env, check=True).stdout)  # the next command
    last = hist[-1]
    assert last["action"] in (action, f"force-{action}") and last["phase"] in ("done", "aborted") and last["recovered"] is True
    after = _aliases(env)
    if point == "intent" or action == "register":  # the registry had not moved (or the version had no alias yet): rolled back
        assert last["phase"] == "aborted" and after == before
    else: assert last["phase"] == "done"
    if action == "register":  # nothing half-registered: the version made before the crash is gone
        code = "import mlkit.config; from mlkit.tracking import mlflow; mlkit.config.configure(); print(len(mlflow().MlflowClient().search_model_versions(\"name='m'\")))"
        n = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout.split()[-1]
        assert n == str(len(vs))  # the template's six
    _agree(versions)


def test_an_alias_moved_around_mlkit_stops_moves_until_adopted(versions):
    env, vs = versions["env"], versions["versions"]
    code = ("import mlkit.config; from mlkit.tracking import mlflow; mlkit.config.configure();"
            f"mlflow().MlflowClient().set_registered_model_alias('m', 'champion', '{vs[3]}')")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    v = mlkit("models", "verify", "m", env=env)
    assert v.returncode == 1 and f"the registry's champion is {vs[3]}, the ledger's last move left it at {vs[1]}" in v.stderr
    r = mlkit("models", "promote", "m", vs[4], "--force", "--reason", "x", env=env)
    assert r.returncode == 2 and "an alias was moved around mlkit" in r.stderr
    assert mlkit("models", "verify", "m", "--adopt", env=env).returncode == 2  # a reason is required
    mlkit("models", "verify", "m", "--adopt", "--reason", "moved in the MLflow UI by ops", env=env, check=True)
    mlkit("models", "promote", "m", vs[4], "--force", "--reason", "x", env=env, check=True)
    _agree(versions)


def test_the_anchor_shows_a_cut_end_and_a_replaced_record(versions):
    env, s = versions["env"], versions["settings"]
    good = s.ledger_path.read_bytes()
    s.ledger_path.write_bytes(b"".join(good.splitlines(keepends=True)[:-2]))  # the last register cut off, intent and outcome
    r = mlkit("models", "promote", "m", versions["versions"][0], "--force", "--reason", "x", env=env)
    assert r.returncode == 2 and "but the ledger ends at record" in r.stderr
    s.ledger_path.write_bytes(good)
    mlkit("models", "promote", "m", versions["versions"][0], "--force", "--reason", "x", env=env, check=True)


def test_a_removed_anchor_and_the_ledger_s_own_names_are_refused(versions):
    "Found by review: the project's anchor deleted alone went unnoticed; a model could be named as the ledger's lock."
    env = versions["env"]
    client = ("import mlkit.config; from mlkit.tracking import mlflow; mlkit.config.configure(); c = mlflow().MlflowClient();")
    subprocess.run([sys.executable, "-c", client + "c.delete_registered_model_tag('mlkit.ledger', 'mlkit.ledger.head')"], env=env, check=True, timeout=120)
    v = mlkit("models", "verify", env=env)
    assert v.returncode == 1 and "the project's anchor is missing from the registry" in v.stderr, v.stderr
    r = mlkit("models", "history", "m", env=env)
    assert r.returncode == 2 and "the project's anchor is missing" in r.stderr
    for name in ("mlkit.ledger.lock", "mlkit.ledger"):
        t = mlkit("train", name, env=env)
        assert t.returncode == 2 and "are mlkit's own" in t.stderr, t.stderr


def test_adopting_a_retired_champion_is_refused(versions):
    env, vs = versions["env"], versions["versions"]
    mlkit("models", "retire", "m", vs[3], "--reason", "old", env=env, check=True)
    code = ("import mlkit.config; from mlkit.tracking import mlflow; mlkit.config.configure();"
            f"mlflow().MlflowClient().set_registered_model_alias('m', 'champion', '{vs[3]}')")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    r = mlkit("models", "verify", "m", "--adopt", "--reason", "oops", env=env)
    assert r.returncode == 2 and f"version {vs[3]} is retired" in r.stderr, r.stderr
    h = mlkit("models", "history", "m", env=env)
    assert h.returncode == 0 and "an alias was moved around mlkit" in h.stderr  # shown, with a warning
