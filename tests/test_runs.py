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


def _cmdline(p) -> list[str]:
    "A process's command line; none for one that exited (or became a zombie) while the children were listed."
    try: return p.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied): return []


def test_killed_kernel_fails_the_run(tmp_path):
    env = project_env(write_project(tmp_path))
    proc = subprocess.Popen([MLKIT, "train", "penguins", "-p", "epochs=100000"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kernel, deadline = None, time.monotonic() + 120
        while kernel is None and time.monotonic() < deadline:
            kids = psutil.Process(proc.pid).children(recursive=True)
            kernel = next((k for k in kids if "ipykernel_launcher" in " ".join(_cmdline(k))), None)
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
    code = f"import mlkit.tracking as t; print(t.mlflow().MlflowClient().get_run('{recorded['run_id']}').data.tags['mlkit.dataset_version'])"
    dv = subprocess.run([sys.executable, "-c", code], env=recorded["env"], capture_output=True, text=True, check=True).stdout.strip()
    p = recorded["state"] / "snapshots" / f"{dv.split(':')[1]}.parquet"
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
    # what chose it, on the parent and on the registered child (the gate refuses a candidate chosen by a test_ metric)
    code = ("import mlkit.tracking as t; c = t.mlflow().MlflowClient();"
            f"print(*[c.get_run(r).data.tags.get('mlkit.sweep.selected_by') for r in ('{parent['id']}', '{best['id']}')])")
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split() == ["val_accuracy"] * 2


def test_a_sweep_never_chooses_by_a_metric_without_a_validation_twin(tmp_path):
    env = {**project_env(write_project(tmp_path)), "MLKIT_GATE__METRIC": "accuracy"}
    r = mlkit("train", "penguins", "--sweep", "lr=0.01,0.1", env=env)
    assert r.returncode == 2 and "a sweep chooses by a validation metric" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "state" / "runs").exists() or not list((tmp_path / "state" / "runs").rglob("*.ipynb"))  # nothing ran


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "/etc/passwd", "x" * 101])
def test_a_model_name_stays_inside_the_training_folder(tmp_path, name):
    "`mlkit train ../../x` runs no notebook outside the training folder: a one-line error naming the parameter."
    env = project_env(write_project(tmp_path))
    for args in (["train", name], ["train", name, "--sweep", "lr=0.1"]):
        r = mlkit(*args, env=env)
        assert r.returncode == 2 and r.stderr.startswith(f"mlkit train: model name {name!r}") and r.stderr.count("\n") == 1, r.stderr


def test_reproduce_refuses_a_planted_model_name_or_notebook_path(tmp_path):
    "The tags `reproduce` reads are data: a model name or notebook path that leaves its folder is refused before anything runs."
    env = project_env(write_project(tmp_path))
    code = ("import mlkit.tracking as t; c = t.mlflow().MlflowClient(); e = t.experiment_id('penguins');"
            "tags = {'mlkit.notebook': 'nbs/train/penguins.ipynb', 'mlkit.dataset_version': 'sha256:' + '0' * 64};"
            "print(c.create_run(e, tags={**tags, 'mlkit.model': '../../x'}).info.run_id,"
            " c.create_run(e, tags={**tags, 'mlkit.model': 'penguins', 'mlkit.notebook': '../../../x.ipynb'}).info.run_id)")
    name_run, nb_run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    r = mlkit("reproduce", name_run, env=env)
    assert r.returncode == 2 and f"run {name_run}: model name '../../x'" in r.stderr, r.stderr
    import polars as pl
    from mlkit.snapshots import snapshot
    snap = snapshot(pl.DataFrame({"a": [1]}), tmp_path / "state" / "snapshots")
    subprocess.run([sys.executable, "-c", f"import mlkit.tracking as t; t.mlflow().MlflowClient().set_tag('{nb_run}', 'mlkit.dataset_version', '{snap.id}')"],
                   env=env, check=True)
    r = mlkit("reproduce", nb_run, env=env)
    assert r.returncode == 2 and "notebook '../../../x.ipynb' is outside the repository" in r.stderr, r.stderr
