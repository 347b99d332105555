"""`mlkit reproduce` trains on the recorded snapshot, never on the source file again: in a user's own project (`mlkit
init`, `mlkit new`, a git repository, mlkit found from the folder as a user runs it), a run is trained, its data file
then changes, and the reproduction still matches, for a notebook with the `dataset_version` parameter and for one
written before it (`MLKIT_DATASET_VERSION`). A snapshot that is gone fails closed, naming it, before anything runs.
An untracked training notebook makes the run's tree dirty."""
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import BIN, MLKIT

pytestmark = pytest.mark.papermill


def _houses(n=300, seed=0) -> pl.DataFrame:
    "A regression: a house's price from its size, rooms and city (generated with a seed)."
    rng = np.random.default_rng(seed)
    sqft, rooms, city = rng.uniform(40, 250, n), rng.integers(1, 7, n), rng.choice(["north", "south", "east"], n)
    price = 2000 * sqft + 15000 * rooms + np.select([city == "north", city == "south"], [60000, -20000], 0) + rng.normal(0, 10000, n)
    return pl.DataFrame({"house_id": np.arange(1, n + 1), "sqft": sqft.round(1), "rooms": rooms, "city": city, "price": price.round(0)})


def _run(*args, cwd, env, check=True):
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and r.returncode: raise AssertionError(f"{args} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _run_id(train_stdout: str) -> str: return train_stdout.split("run ", 1)[1].split(":", 1)[0]


def _tags(env, cwd, run_id) -> dict:
    code = f"import json, mlkit.tracking as t; print(json.dumps(t.mlflow().MlflowClient().get_run('{run_id}').data.tags))"
    return json.loads(_run(sys.executable, "-c", code, cwd=cwd, env=env).stdout)


def _n_runs(env, cwd, model) -> int:
    code = f"import mlkit.tracking as t; c = t.mlflow().MlflowClient(); print(len(c.search_runs([c.get_experiment_by_name('{model}').experiment_id])))"
    return int(_run(sys.executable, "-c", code, cwd=cwd, env=env).stdout)


def _drop_dataset_version(nb_path):
    "The notebook as `mlkit new` wrote it before the `dataset_version` parameter."
    nb = json.loads(nb_path.read_text())
    for c in nb["cells"]:
        c["source"] = [ln.replace(", dataset_version=dataset_version", "") for ln in c["source"] if not ln.startswith("dataset_version = ")]
        if c["source"]: c["source"][-1] = c["source"][-1].rstrip("\n")
    nb_path.write_text(json.dumps(nb, indent=1))
    assert "dataset_version" not in nb_path.read_text()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A user's project in git: two models from `mlkit new` (one notebook from before `dataset_version`), both trained on a clean tree."
    work = tmp_path_factory.mktemp("repro-user")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    _run(MLKIT, "init", "reprohomes", cwd=work, env=env)
    root = work / "reprohomes"
    (root / "data").mkdir()
    _houses(seed=0).write_csv(root / "data" / "houses.csv")
    _houses(seed=1).write_csv(root / "data" / "legacy.csv")
    _run(MLKIT, "new", "prices", "--data", "data/houses.csv", "--label", "price", cwd=root, env=env)
    _run(MLKIT, "new", "legacy", "--data", "data/legacy.csv", "--label", "price", cwd=root, env=env)
    _drop_dataset_version(root / "nbs" / "train" / "legacy.ipynb")
    git = lambda *a: _run("git", "-c", "user.name=t", "-c", "user.email=t@example.org", *a, cwd=root, env=env)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "two models")
    runs = {m: _run_id(_run(MLKIT, "train", m, "-f", f"nbs/train/{m}.yaml", cwd=root, env=env).stdout) for m in ("prices", "legacy")}
    return {"root": root, "env": env, "git": git, "runs": runs}


def test_untracked_training_notebook_is_recorded_dirty(project):
    root, env = project["root"], project["env"]
    assert _tags(env, root, project["runs"]["prices"])["mlkit.git_dirty"] == "false"  # trained on the committed tree
    _run(MLKIT, "new", "scratchpad", "--data", "data/houses.csv", "--label", "price", cwd=root, env=env)
    project["git"]("add", "settings.ini", "nbs/train/scratchpad.contract.yaml", "nbs/train/scratchpad.yaml", "bentos")
    project["git"]("commit", "-qm", "all but the notebook")
    assert _run("git", "status", "--porcelain", cwd=root, env=env).stdout.strip() == "?? nbs/train/scratchpad.ipynb"
    r = _run(MLKIT, "train", "scratchpad", "-f", "nbs/train/scratchpad.yaml", "-p", "epochs=1", "-p", "register=false", cwd=root, env=env)
    tags = _tags(env, root, _run_id(r.stdout))
    assert tags["mlkit.git_dirty"] == "true", tags  # the notebook that ran is in no commit
    (root / "nbs" / "train" / "scratchpad.ipynb").unlink()


def test_reproduce_trains_on_the_recorded_snapshot_not_the_changed_source(project):
    root, env, runs = project["root"], project["env"], project["runs"]
    recorded = {m: _tags(env, root, runs[m])["mlkit.dataset_version"] for m in runs}
    # the sources move on: other rows, other values (a re-read would train on them, or stop at the contract)
    _houses(n=350, seed=7).with_columns(pl.col("price") * 3).write_csv(root / "data" / "houses.csv")
    _houses(n=350, seed=8).with_columns(pl.col("price") * 3).write_csv(root / "data" / "legacy.csv")
    for model in ("prices", "legacy"):  # legacy's notebook has no `dataset_version`: MLKIT_DATASET_VERSION carries it
        r = _run(MLKIT, "reproduce", runs[model], "--json", cwd=root, env=env, check=False)
        rep = json.loads(r.stdout)
        assert r.returncode == 0 and rep["matches"] and rep["data_ok"] and rep["metric_diffs"] == {}, (model, r.stdout, r.stderr[-2000:])
        assert _tags(env, root, rep["new_run_id"])["mlkit.dataset_version"] == recorded[model]
    assert not list((root / ".mlkit" / "tmp").iterdir())  # the checkouts are gone


def test_reproduce_without_its_snapshot_fails_closed_naming_it(project):
    root, env, run = project["root"], project["env"], project["runs"]["prices"]
    dv = _tags(env, root, run)["mlkit.dataset_version"]
    snap = root / ".mlkit" / "snapshots" / f"{dv.split(':')[1]}.parquet"
    before = _n_runs(env, root, "prices")
    snap.unlink()
    r = _run(MLKIT, "reproduce", run, cwd=root, env=env, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert str(snap) in r.stderr and dv in r.stderr and "nothing was run" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _n_runs(env, root, "prices") == before  # no run started
