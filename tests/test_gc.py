"""`mlkit gc` on a real project: MLflow SQLite store, BentoML store, snapshots and prediction logs; dry run first."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill  # the project's first version comes from a real training run

DAY = 86_400

# Run in the project's environment after the first training run: more versions of the same logged model, three
# Bentos, two retired versions, a deleted run nothing needs and the deleted training run that every version needs.
SETUP = """
import json, sys
import polars as pl
from mlkit.bento import build
from mlkit.config import configure
from mlkit.snapshots import snapshot
from mlkit.registry import get_version, register, retire
from mlkit.tracking import experiment_id, mlflow
s = configure()
client = mlflow(s).MlflowClient()
v1 = get_version("penguins", "champion")
def again():  # one more registered version of the champion's logged model, as challenger
    return register(v1.source, "penguins", v1.run_id, v1.tags["mlkit.bundle_sha256"], settings=s).version
v2 = again()
b12 = build("penguins", with_challenger=True)  # champion v1 + challenger v2
v3 = again()
b3 = build("penguins", version=v3)  # v3 alone
b1 = build("penguins")  # the champion alone
for v in (v2, v3): retire("penguins", v, reason="superseded (test)", settings=s)
extra = client.create_run(experiment_id("penguins", s)).info.run_id
client.log_text(extra, "x" * 4096, "notes/scratch.txt")
client.set_terminated(extra)
for r in (extra, v1.run_id): client.delete_run(r)
old = snapshot(pl.DataFrame({"a": [1, 2, 3]}), s.snapshots_dir, source="old.csv")
young = snapshot(pl.DataFrame({"a": [4, 5, 6]}), s.snapshots_dir, source="young.csv")
json.dump({"versions": [v1.version, v2, v3], "bentos": {"b12": b12, "b3": b3, "b1": b1}, "extra_run": extra,
           "train_run": v1.run_id, "train_snapshot": v1.tags["mlkit.dataset_version"], "old_snapshot": old.id,
           "young_snapshot": young.id, "tracking_uri": s.tracking_uri}, sys.stdout)
"""


def _age(path: Path, days: float):
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def _part(folder: Path, days_ago: float) -> Path:
    "A prediction-log part as the serving log names it, written `days_ago`."
    p = folder / f"part-{int((time.time() - days_ago * DAY) * 1e9):020d}-0123abcd.parquet"
    pl.DataFrame({"time": [1], "prediction": ["Adelie"]}).write_parquet(p)
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    ini = write_project(root)
    with ini.open("a") as f: f.write("[retention]\nsnapshot_days = 30\nprediction_log_days = 90\ndeleted_run_days = 0\n")
    env = project_env(ini)
    mlkit("train", "penguins", "-f", REPO / "nbs/train/penguins.yaml", env=env, check=True)
    mlkit("models", "promote", "penguins", env=env, check=True)
    r = subprocess.run([sys.executable, "-c", SETUP], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    state = root / "state"
    snaps = state / "snapshots"
    for vid in (info["old_snapshot"], info["train_snapshot"]):  # both past snapshot_days; only the old one is unreferenced
        for suffix in (".parquet", ".json"): _age(snaps / f"{vid.split(':')[1]}{suffix}", 40)
    logs = state / "predictions" / "penguins"
    logs.mkdir(parents=True)
    info["old_part"], info["fresh_part"] = _part(logs, 100), _part(logs, 1)
    return {"root": root, "env": env, "state": state, **info}


def _models(state: Path) -> dict:
    "BentoML model tag by registered version."
    from mlkit.retention import bentoml_models
    return {m["version"]: m["tag"] for m in bentoml_models(state / "bentoml")}


def _bento_dir(state: Path, tag: str) -> Path: return state / "bentoml" / "bentos" / tag.replace(":", "/")


def test_dry_run_lists_then_gc_removes_exactly_that(project):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlkit.ledger import read_ledger, verify_ledger
    p, state, env = project, project["state"], project["env"]
    models, bentos = _models(state), project["bentos"]
    assert set(models) == {"1", "2", "3"}, models
    expected = {("snapshot", p["old_snapshot"]), ("bento", bentos["b3"]), ("bentoml_model", models["3"]),
                ("prediction_log", f"penguins/{p['old_part'].name}"), ("mlflow_run", p["extra_run"])}

    dry = json.loads(mlkit("gc", "--dry-run", "--json", env=env, check=True).stdout)
    assert dry["dry_run"] and dry["ledger_seq"] is None
    assert {(i["kind"], i["ref"]) for i in dry["remove"]} == expected, dry["remove"]
    kept = {(i["kind"], i["ref"]): i["reason"] for i in dry["keep"]}
    assert "penguins v1" in kept[("snapshot", p["train_snapshot"])]  # old, but registered versions trained on it
    assert "champion" in kept[("bento", bentos["b12"])] and "retired penguins v2" in kept[("bento", bentos["b12"])]
    assert bentos["b12"] in kept[("bentoml_model", models["2"])]  # retired, but the kept Bento loads it
    assert "registered" in kept[("mlflow_run", p["train_run"])]  # deleted, but every version came from it
    assert dry["mlflow_gc"][-2:] == ["--run-ids", p["extra_run"]]  # mlflow gc is told which runs, and only those
    assert dry["bytes"] > 0 and dry["counts"]["mlflow_run"] == 1

    # a dry run deletes nothing
    old_snap = state / "snapshots" / f"{p['old_snapshot'].split(':')[1]}.parquet"
    client = MlflowClient(p["tracking_uri"])
    assert old_snap.exists() and p["old_part"].exists() and _bento_dir(state, bentos["b3"]).is_dir()
    assert (state / "bentoml" / "models" / models["3"].replace(":", "/")).is_dir()
    assert client.get_run(p["extra_run"]).info.lifecycle_stage == "deleted"
    extra_artifacts = Path(client.get_run(p["extra_run"]).info.artifact_uri.removeprefix("file://"))
    assert (extra_artifacts / "notes" / "scratch.txt").is_file()
    assert not any(r["action"] == "gc" for r in read_ledger(state / "ledger.jsonl"))

    done = json.loads(mlkit("gc", "--json", env=env, check=True).stdout)
    assert {(i["kind"], i["ref"]) for i in done["remove"]} == expected

    # exactly those went ...
    assert not old_snap.exists() and not old_snap.with_suffix(".json").exists()
    assert not p["old_part"].exists() and p["fresh_part"].exists()
    assert not _bento_dir(state, bentos["b3"]).exists()
    assert set(_models(state)) == {"1", "2"}
    with pytest.raises(MlflowException): client.get_run(p["extra_run"])
    assert not extra_artifacts.exists()
    # ... and what the champion, the registered versions and the young data need is all there
    for vid in (p["train_snapshot"], p["young_snapshot"]):
        assert (state / "snapshots" / f"{vid.split(':')[1]}.parquet").exists(), vid
    assert _bento_dir(state, bentos["b1"]).is_dir() and _bento_dir(state, bentos["b12"]).is_dir()
    assert client.get_run(p["train_run"]).info.lifecycle_stage == "deleted"
    lineage = json.loads(mlkit("models", "lineage", "penguins@champion", "--json", env=env, check=True).stdout)
    assert lineage[0]["version"] == "1" and lineage[0]["dataset_version"] == p["train_snapshot"]

    # one ledger record: the settings and the counts, never a value from the data
    (rec,) = [r for r in read_ledger(state / "ledger.jsonl") if r["action"] == "gc"]
    assert rec["seq"] == done["ledger_seq"] and rec["error"] is None
    assert rec["removed"] == {"snapshot": 1, "bento": 1, "bentoml_model": 1, "prediction_log": 1, "mlflow_run": 1}
    assert rec["bytes_freed"] == done["bytes"] > 0 and "snapshot_days=30" in rec["reason"]
    assert verify_ledger(state / "ledger.jsonl") == []

    # nothing is left to collect; the table says so
    again = mlkit("gc", "--dry-run", env=env, check=True).stdout
    assert "would remove 0 item(s), 0 B (dry run: nothing deleted)" in again, again


HELD = """
from mlkit.config import configure
from mlkit.tracking import mlflow
s = configure()
client = mlflow(s).MlflowClient()
src = client.get_model_version_by_alias("penguins", "champion").source
exp = client.create_experiment("scratch")
run = client.create_run(exp).info.run_id
client.create_registered_model("scratch")
client.create_model_version("scratch", src, run_id=run)
client.delete_experiment(exp)  # its runs are deleted with it
print(exp, run, s.tracking_uri)
"""


def test_no_mlflow_gc_while_a_deleted_experiment_holds_a_registered_run(project):
    "`mlflow gc` would purge every run of a deleted experiment, registered or not: mlkit runs none and says why."
    from mlflow import MlflowClient
    env = project["env"]
    r = subprocess.run([sys.executable, "-c", HELD], env=env, cwd=project["root"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    exp, run, uri = r.stdout.split()[-3:]
    try:
        dry = json.loads(mlkit("gc", "--dry-run", "--json", env=env, check=True).stdout)
        assert dry["mlflow_gc"] == [] and not [i for i in dry["remove"] if i["kind"].startswith("mlflow_")], dry
        kept = {(i["kind"], i["ref"]): i["reason"] for i in dry["keep"]}
        assert "scratch v1 was registered from it" in kept[("mlflow_run", run)]
        assert "waits" in kept[("mlflow_experiment", exp)]
        assert any(f"mlflow experiments restore --experiment-id {exp}" in n for n in dry["notes"]), dry["notes"]
    finally:
        MlflowClient(uri).restore_experiment(exp)
