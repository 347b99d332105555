"""`mlkit.registry`: the model lifecycle in CI with tiny parameters: gated promotion, a refused worse model, rollback,
retirement, the audit ledger and `mlkit models history` / `lineage`."""
import json

import pytest
from conftest import mlkit, project_env, write_project

pytestmark = pytest.mark.papermill

POOR = ["-p", "epochs=1", "-p", "lr=0.001", "-p", "hidden=[4]"]  # test accuracy 0.36 on the penguins' test rows
GOOD = ["-p", "epochs=3", "-p", "lr=0.01", "-p", "hidden=[8]"]  # test accuracy 0.96


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    ini = write_project(root)
    ini.write_text(ini.read_text() + "[gate]\nmetric = test_accuracy\nmargin = 0.0\nfloors = test_accuracy>=0.3\n")
    env = project_env(ini)
    for params in (POOR, GOOD, POOR):  # v1, v2, v3
        mlkit("train", "penguins", *params, env=env, check=True)
    return {"env": env, "state": root / "state"}


def _champion(env):
    out = mlkit("models", "lineage", "penguins@champion", "--json", env=env, check=True).stdout
    return json.loads(out)[0]["version"]


def test_promote_refuse_rollback_and_history(project):
    env = project["env"]
    r = mlkit("models", "promote", "penguins", "1", env=env, check=True)
    assert "version 1 is now champion" in r.stdout and _champion(env) == "1"
    r = mlkit("models", "promote", "penguins", "2", env=env, check=True)
    assert "beats_champion: test_accuracy 0.95" in r.stdout and _champion(env) == "2"
    # v3 is the challenger and worse: refused, nothing changes
    r = mlkit("models", "promote", "penguins", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "version 3 vs champion 2: gate FAILED" in r.stderr and "FAIL beats_champion" in r.stderr
    assert _champion(env) == "2"
    r = mlkit("models", "rollback", "penguins", "--reason", "ci drill", env=env, check=True)
    assert "from version 2 to version 1" in r.stdout and _champion(env) == "1"
    hist = json.loads(mlkit("models", "history", "penguins", "--json", env=env, check=True).stdout)
    moves = [(h["action"], h["from_version"], h["to_version"]) for h in hist]
    assert moves == [("register", None, "1"), ("register", "1", "2"), ("register", "2", "3"),  # the challenger it replaced
                     ("promote", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1")]
    assert all(h["who"] and h["time"] for h in hist) and hist[4]["gate"]["passed"]
    text = mlkit("models", "history", "penguins", env=env, check=True).stdout
    assert "rollback" in text and "ci drill" in text
    from mlkit.ledger import verify_ledger
    assert verify_ledger(project["state"] / "ledger.jsonl") == []


def test_force_needs_reason_and_retired_cannot_serve(project):
    env = project["env"]
    r = mlkit("models", "promote", "penguins", "3", "--force", env=env)
    assert r.returncode == 2 and "--force needs a --reason" in r.stderr
    champ = _champion(env)
    r = mlkit("models", "retire", "penguins", champ, "--reason", "x", env=env)
    assert r.returncode == 2 and "roll back first" in r.stderr
    mlkit("models", "retire", "penguins", "3", "--reason", "worse than v2", env=env, check=True)
    r = mlkit("models", "promote", "penguins", "3", "--force", "--reason", "try", env=env)
    assert r.returncode == 1 and "FAIL not_retired" in r.stderr and _champion(env) == champ
    mlkit("models", "unretire", "penguins", "3", "--reason", "re-check", env=env, check=True)
    mlkit("models", "promote", "penguins", "2", env=env, check=True)
    r = mlkit("models", "promote", "penguins", "3", "--force", "--reason", "incident override", env=env, check=True)
    assert "(forced)" in r.stdout and "FAIL beats_champion" in r.stdout and _champion(env) == "3"
    hist = json.loads(mlkit("models", "history", "penguins", "--json", env=env, check=True).stdout)
    assert [h["action"] for h in hist[-4:]] == ["retire", "unretire", "promote", "force-promote"]
    assert hist[-1]["reason"] == "incident override" and not hist[-1]["gate"]["passed"]


def test_lineage_from_any_link(project):
    env = project["env"]
    (v2,) = json.loads(mlkit("models", "lineage", "penguins/2", "--json", env=env, check=True).stdout)
    assert v2["parameters"]["epochs"] == "3" and v2["notebook"] == "nbs/train/penguins.ipynb"
    assert len(v2["git_commit"]) == 40 and v2["dataset_version"].startswith("sha256:")
    by_run = json.loads(mlkit("models", "lineage", v2["run_id"], "--json", env=env, check=True).stdout)
    assert [c["version"] for c in by_run] == ["2"]
    by_data = json.loads(mlkit("models", "lineage", v2["dataset_version"], "--json", env=env, check=True).stdout)
    assert sorted(c["version"] for c in by_data) == ["1", "2", "3"]
    text = mlkit("models", "lineage", "penguins/2", env=env, check=True).stdout
    assert "dataset_version" in text and v2["run_id"] in text
