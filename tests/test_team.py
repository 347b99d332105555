"""The team suite: the whole lifecycle against a real team stack (PostgreSQL, an S3 endpoint, `mlflow server` with
MLflow's basic-auth app; scripts/team_stack.py, one a session) with the same code as the embedded default and only
settings changed; a teammate's empty state folder; two users promoting at once; a user MLflow's auth refuses."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, BIN, bento_served, mlkit
from teamstack import client_json, s3_keys, stack_fixture, team_project
from test_ledger import MAKE_VERSIONS

ROUNDS = int(os.environ.get("MLKIT_SOAK_ROUNDS", "3"))  # repetitions of the two-user test; `make soak` runs 10 or more
POOR = ["-p", "epochs=1", "-p", "lr=0.001", "-p", "hidden=[4]"]  # as tests/test_registry.py: test accuracy ~0.36
GOOD = ["-p", "epochs=3", "-p", "lr=0.01", "-p", "hidden=[8]"]  # ~0.96
GATE = "[gate]\nmetric = test_accuracy\nmargin = 0.0\nfloors = test_accuracy>=0.3\n"
ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}

team_stack = stack_fixture()

def _run_id(stdout: str) -> str: return re.search(r"^run ([0-9a-f]{32}):", stdout, re.M).group(1)  # MLflow prints "View run" lines too


def _json(r: subprocess.CompletedProcess):
    "The JSON a `--json` command printed: all of its standard output, nothing else."
    try: return json.loads(r.stdout)
    except ValueError: raise AssertionError(f"not JSON (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-1000:]}") from None


def _history(env, name="penguins") -> list[dict]:
    return _json(mlkit("models", "history", name, "--json", env=env, check=True))


def _alias(env, name, alias="champion"):
    return client_json(env, f"c.get_model_version_by_alias({name!r}, {alias!r}).version")


@pytest.fixture(scope="module")
def team(team_stack, tmp_path_factory):
    "alice trains penguins (poor) in her checkout, bob (good) in his: two papermill runs, versions 1 and 2 on the server."
    alice = team_project(tmp_path_factory.mktemp("alice"), team_stack, "alice", GATE)
    bob = team_project(tmp_path_factory.mktemp("bob"), team_stack, "bob", GATE)
    ra = mlkit("train", "penguins", *POOR, env=alice["env"])
    rb = mlkit("train", "penguins", *GOOD, env=bob["env"])
    assert ra.returncode == rb.returncode == 0, ra.stderr[-3000:] + rb.stderr[-3000:]
    return {"stack": team_stack, "alice": alice, "bob": bob, "runs": {"alice": _run_id(ra.stdout), "bob": _run_id(rb.stdout)}}


def test_training_and_registration_land_on_the_shared_side(team):
    "Runs, versions and artifacts live on the server and in the object store; no MLflow store in anyone's state folder."
    env = team["alice"]["env"]
    versions = client_json(env, "sorted((m.version, m.run_id) for m in c.search_model_versions(\"name='penguins'\"))")
    assert versions == [["1", team["runs"]["alice"]], ["2", team["runs"]["bob"]]]
    assert _alias(env, "penguins", "challenger") == "2"
    for user in ("alice", "bob"):
        state = team[user]["state"]
        assert not (state / "mlflow.db").exists() and not (state / "artifacts").exists(), sorted(p.name for p in state.iterdir())
    keys = s3_keys(team["stack"], "artifacts/")
    assert any(k.endswith("model.safetensors") for k in keys) and any(k.endswith(".ipynb") for k in keys), keys[:20]
    hist = _history(env)
    assert [(h["action"], h["to_version"]) for h in hist] == [("register", "1"), ("register", "2")]


def test_gate_promote_rollback_and_the_shared_audit_trail(team):
    a, b = team["alice"]["env"], team["bob"]["env"]
    mlkit("models", "promote", "penguins", "1", env=a, check=True)
    r = mlkit("models", "promote", "penguins", env=b, check=True)  # the challenger, 2, through the gate, by bob
    assert "beats_champion" in r.stdout and _alias(a, "penguins") == "2"
    r = mlkit("models", "rollback", "penguins", "--reason", "team drill", env=a, check=True)
    assert "from version 2 to version 1" in r.stdout and _alias(b, "penguins") == "1"
    mlkit("models", "promote", "penguins", "2", env=a, check=True)
    moves = [(h["action"], h["from_version"], h["to_version"]) for h in _history(b)]  # bob reads what alice wrote: one trail
    assert moves[2:] == [("promote", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1"), ("promote", "1", "2")]
    for env in (a, b): assert mlkit("models", "verify", "penguins", env=env).returncode == 0
    assert not (team["alice"]["state"] / "ledger.jsonl").exists()  # the ledger lives with the registry, not in a checkout


def test_the_trail_names_each_teammate(team):
    "Who moved what, on a team: the MLflow user each command ran as, not the machine's login."
    regs = [h for h in _history(team["alice"]["env"]) if h["action"] == "register"]
    assert [h["who"] for h in regs] == ["alice", "bob"]


@pytest.fixture(scope="module")
def served(team):
    "alice builds the champion's Bento from the shared registry and serves it (real `bentoml serve` on 127.0.0.1)."
    from mlkit.demo import post_json
    p = team["alice"]
    bento = mlkit("build", "penguins", env=p["env"], check=True).stdout.strip().splitlines()[-1]
    answers = []
    with bento_served(bento, p["ini"], p["env"], p["root"] / "serve.log") as (url, _):
        for _ in range(20): answers.append(post_json(f"{url}/predict", {"rows": [ROW]}))
    return {"bento": bento, "answers": answers}


def test_build_and_serve_the_champion(team, served):
    assert served["bento"].startswith("penguins:")
    assert all(status == 200 for status, _, _ in served["answers"]), served["answers"][:2]
    assert {body["version"] for _, body, _ in served["answers"]} == {"2"}
    tags = client_json(team["alice"]["env"], "c.get_model_version('penguins', '2').tags")
    assert tags["mlkit.bento"] == served["bento"]  # the build is recorded on the shared version


def test_monitor_logs_its_report_to_the_server(team, served):
    env = team["alice"]["env"]
    r = mlkit("monitor", "penguins", "--log", "--json", env=env)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-2000:]  # 1: a threshold crossed by 20 rows
    runs = client_json(env, "[(r.info.run_id, r.data.tags.get('mlflow.user')) for r in "
                            "c.search_runs([c.get_experiment_by_name('monitoring').experiment_id])]")
    assert len(runs) == 1 and runs[0][1] == "alice"


def test_card_gc_and_reproduce(team, served, tmp_path):
    env = team["alice"]["env"]
    mlkit("models", "card", "penguins@champion", "-o", tmp_path / "card.html", env=env, check=True)
    html = (tmp_path / "card.html").read_text()
    assert "penguins" in html and team["runs"]["bob"] in html
    r = mlkit("gc", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = mlkit("reproduce", team["runs"]["alice"], "--json", env=env)
    rep = _json(r)
    assert r.returncode == 0 and rep["matches"] and rep["data_ok"] and rep["metric_diffs"] == {}, rep


def test_a_teammate_with_an_empty_state_folder_reproduces_and_cards(team, tmp_path):
    "dave's fresh checkout: the snapshot and the executed notebook of bob's run come from the object store."
    dave = team_project(tmp_path / "dave", team["stack"], "dave", GATE)
    r = mlkit("reproduce", team["runs"]["bob"], "--json", env=dave["env"])
    rep = _json(r)
    assert r.returncode == 0 and rep["matches"] and rep["data_ok"], rep
    mlkit("models", "card", "penguins/2", "-o", tmp_path / "card.html", env=dave["env"], check=True)
    html = (tmp_path / "card.html").read_text()
    assert team["runs"]["bob"] in html and "test_accuracy" in html
    assert not (dave["state"] / "mlflow.db").exists()


def test_a_user_without_permission_gets_a_one_line_403(team, tmp_path):
    "carol may only read penguins (MLflow's auth: not in the team role): her promotion is refused in one line naming the 403."
    assert team["stack"].permission("carol", "penguins") == "READ"
    carol = team_project(tmp_path / "carol", team["stack"], "carol", GATE)
    before = _alias(team["alice"]["env"], "penguins")
    r = mlkit("models", "promote", "penguins", "1", "--force", "--reason", "carol tries", env=carol["env"])
    assert r.returncode != 0 and "403" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _alias(team["alice"]["env"], "penguins") == before
    assert mlkit("models", "verify", "penguins", env=team["alice"]["env"]).returncode == 0


# --- two users at once: pre-built bundles (tests/test_ledger.py's template), registered and promoted side by side --

_REGISTER = "    print(register(info.model_uri, \"m\", run.info.run_id, bundle_sha256(b), settings=s).version, flush=True)\n"
assert _REGISTER in MAKE_VERSIONS, "tests/test_ledger.py's MAKE_VERSIONS changed: update the two-user script"
DUO = (MAKE_VERSIONS.replace(_REGISTER, "    v = register(info.model_uri, 'm', run.info.run_id, bundle_sha256(b), settings=s).version\n"
                                        "    promote('m', v, force=True, reason=f'{sys.argv[5]} round {i}', settings=s)\n"
                                        "    print(v, flush=True)\n")
       .replace('"m"', "sys.argv[4]").replace("'m'", "sys.argv[4]")
       .replace("from mlkit.registry import register", "from mlkit.registry import promote, register"))
assert "promote(sys.argv[4], v, force=True" in DUO


@pytest.mark.parametrize("rep", range(ROUNDS))
def test_two_users_register_and_promote_at_once(team_stack, tmp_path, rep):
    "alice and bob, two processes, 3 rounds each of register + forced promote: unique versions, one trail, no lost move."
    name = f"duo{rep}"
    users = {u: team_project(tmp_path / u, team_stack, u) for u in ("alice", "bob")}
    procs = {u: subprocess.Popen([str(BIN / "python"), "-c", DUO, str(p["ini"]), str(REPO / "nbs/train/penguins.contract.yaml"),
                                  "3", name, u], env=p["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for u, p in users.items()}
    outs = {u: p.communicate(timeout=900) for u, p in procs.items()}
    assert {u: p.returncode for u, p in procs.items()} == {"alice": 0, "bob": 0}, {u: o[1][max(o[1].rfind("Traceback"), 0):][-3000:] for u, o in outs.items()}
    made = {u: [ln for ln in o[0].split() if ln.isdigit()] for u, o in outs.items()}  # MLflow prints "View run" lines too
    assert sorted(made["alice"] + made["bob"], key=int) == [str(i) for i in range(1, 7)], made  # unique versions, none lost
    env = users["alice"]["env"]
    hist = _history(env, name)
    regs = [h for h in hist if h["action"] == "register"]
    promos = [h for h in hist if h["action"] in ("promote", "force-promote")]  # forced, recorded as such when the gate failed
    assert sorted(h["to_version"] for h in regs) == sorted(h["to_version"] for h in promos) == sorted(made["alice"] + made["bob"], key=int), \
        [(h["action"], h["from_version"], h["to_version"], h.get("phase")) for h in hist]
    for before, after in zip(promos, promos[1:]):  # each move starts where the last one ended: none lost, none crossed
        assert after["from_version"] == before["to_version"], (before, after)
    assert promos[0]["from_version"] is None and _alias(env, name) == promos[-1]["to_version"]
    reasons = {h["reason"].split()[0] for h in promos}
    assert reasons == {"alice", "bob"}  # both users' moves are in the one trail
    for u, p in users.items(): assert mlkit("models", "verify", name, env=p["env"]).returncode == 0, u
    for p in users.values(): assert not (p["state"] / "ledger.jsonl").exists()


def test_the_stack_leaves_nothing_running(tmp_path):
    "A process that starts a stack and is SIGKILLed takes PostgreSQL, S3 and MLflow (its workers too) with it (PR_SET_PDEATHSIG)."
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from team_stack import TeamStack\n"
            "s = TeamStack(sys.argv[2]).start()\n"
            "print(' '.join(str(p.pid) for p in s.procs.values()), flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(REPO / "scripts"), str(tmp_path / "stack")], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 3
        groups = {pid: os.getpgid(pid) for pid in pids}
        p.kill()
        p.wait()
        import time
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_members(groups.values()): time.sleep(0.2)
        assert not _group_members(groups.values())
    finally:
        if p.poll() is None: p.kill()


def _group_members(pgids) -> list[int]:
    "Live (not zombie) processes in the process groups `pgids`."
    import psutil
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) in set(pgids) and proc.info["status"] != psutil.STATUS_ZOMBIE: out.append(proc.pid)
        except (ProcessLookupError, psutil.Error): pass
    return out
