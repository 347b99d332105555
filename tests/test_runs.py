"""`mlkit.runs`: training notebooks run by papermill. Runs that go wrong (a cell past the timeout, a killed kernel) are
marked FAILED, keep the executed notebook and register nothing; a sweep registers its best child; `mlkit reproduce`
re-executes a recorded run from its commit, parameters and snapshot, and reports a changed snapshot or an unknown
commit instead of papering over it."""
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from conftest import MLKIT, REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill


def _registered(env) -> int:
    code = "import mlkit.tracking as t; print(len(t.mlflow().MlflowClient().search_model_versions()))"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def _run_status(env, run_id) -> str:
    code = f"import mlkit.tracking as t; print(t.mlflow().MlflowClient().get_run('{run_id}').info.status)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_cell_timeout_fails_the_run(tmp_path):
    env = {**project_env(write_project(tmp_path)), "MLKIT_RUNS__CELL_TIMEOUT": "4"}
    r = mlkit("train", "penguins", "-p", "epochs=100000", env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "timed out" in r.stderr.lower() or "timeout" in r.stderr.lower(), r.stderr
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    assert _run_status(env, run_id) == "FAILED"
    assert (tmp_path / "state" / "runs" / "penguins" / f"{run_id}.ipynb").is_file()
    assert _registered(env) == 0


def test_killed_kernel_fails_the_run(tmp_path):
    env = project_env(write_project(tmp_path))
    proc = subprocess.Popen([MLKIT, "train", "penguins", "-p", "epochs=100000"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kernel, deadline = None, time.monotonic() + 120
        while kernel is None and time.monotonic() < deadline:
            kids = psutil.Process(proc.pid).children(recursive=True)
            kernel = next((k for k in kids if "ipykernel_launcher" in " ".join(k.cmdline())), None)
            time.sleep(0.2)
        assert kernel is not None, "no kernel started"
        time.sleep(8)  # let it reach the training cell
        kernel.kill()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 1, out + err
    assert "dead" in err.lower() or "died" in err.lower(), err
    run_id = out.split("run ", 1)[1].split(":", 1)[0]
    assert _run_status(env, run_id) == "FAILED"
    assert (tmp_path / "state" / "runs" / "penguins" / f"{run_id}.ipynb").is_file()
    assert _registered(env) == 0


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


def test_sweep_runs_nested_children_and_registers_the_best(tmp_path):
    env = project_env(write_project(tmp_path))
    r = mlkit("train", "penguins", "-p", "epochs=2", "--sweep", "lr=0.0003,0.01", env=env, check=True)
    assert "sweep" in r.stdout and "2 runs" in r.stdout and "registered as challenger" in r.stdout
    code = ("import json, mlkit.tracking as t; c = t.mlflow().MlflowClient(); e = c.get_experiment_by_name('penguins');"
            "runs = c.search_runs([e.experiment_id]);"
            "print(json.dumps([{'id': x.info.run_id, 'parent': x.data.tags.get('mlflow.parentRunId'), 'best': x.data.tags.get('mlkit.best_child'),"
            "'acc': x.data.metrics.get('val_accuracy'), 'by': x.data.tags.get('mlkit.best_by'), 'lr': x.data.params.get('lr')} for x in runs]));"
            "v = c.get_model_version_by_alias('penguins', 'challenger'); print(v.run_id, len(c.search_model_versions()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    runs = json.loads(out[0])
    (parent,) = [x for x in runs if x["parent"] is None]
    kids = [x for x in runs if x["parent"] == parent["id"]]
    assert sorted(k["lr"] for k in kids) == ["0.0003", "0.01"]
    best = max(kids, key=lambda k: k["acc"])  # on the validation rows, never the test rows the gate judges
    challenger_run, n_versions = out[1].split()
    assert parent["best"] == best["id"] == challenger_run and n_versions == "1" and parent["by"] == "val_accuracy (max)"
