"""`mlkit reproduce`: a recorded run re-executed from its commit, parameters and snapshot matches; a changed snapshot
or an unknown commit is reported, not papered over."""
import json
import os

import pytest
from conftest import mlkit, project_env, write_project

pytestmark = pytest.mark.papermill


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    env = project_env(write_project(root))
    r = mlkit("train", "penguins", "-p", "epochs=3", "-p", "hidden=[8]", env=env, check=True)
    return {"env": env, "run_id": r.stdout.split("run ", 1)[1].split(":", 1)[0], "state": root / "state"}


def test_reproduce_matches(recorded):
    r = mlkit("reproduce", recorded["run_id"], "--json", env=recorded["env"])
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["matches"], r.stdout + r.stderr
    assert rep["metric_diffs"] == {} and rep["data_ok"] and rep["new_run_id"] != recorded["run_id"]
    # the reproduction registered nothing new
    hist = json.loads(mlkit("models", "history", "penguins", "--json", env=recorded["env"], check=True).stdout)
    assert [h["action"] for h in hist] == ["register"]


def test_changed_snapshot_is_a_mismatch_naming_the_file(recorded):
    snaps = list((recorded["state"] / "snapshots").glob("*.parquet"))
    assert len(snaps) == 1
    p = snaps[0]
    os.chmod(p, 0o644)
    import polars as pl
    df = pl.read_parquet(p)
    df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.col("year") + 1).otherwise(pl.col("year")).alias("year")).write_parquet(p)
    r = mlkit("reproduce", recorded["run_id"], env=recorded["env"])
    assert r.returncode == 1 and str(p) in r.stderr and "does not match the snapshot id" in r.stderr, r.stderr


def test_unknown_commit_is_refused(tmp_path):
    env = {**project_env(write_project(tmp_path)), "MLKIT_SOURCE_COMMIT": "0" * 40}
    r = mlkit("train", "penguins", "-p", "epochs=1", env=env, check=True)
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    env.pop("MLKIT_SOURCE_COMMIT")
    r = mlkit("reproduce", run_id, env=env)
    assert r.returncode == 2 and f"commit {'0' * 40} is not in the repository" in r.stderr, r.stderr
