"""What a teammate needs lives on the shared side (issue 20): with `[tracking] share = yes`, two checkouts point at one
MLflow store whose artifacts live outside both state folders (as a team server's object store does). Alice trains
penguins with the real CLI and papermill and promotes it; the run keeps its dataset snapshot and executed notebook
among its artifacts. Bob's state folder is empty: `mlkit reproduce` fetches the snapshot (owner-only, verified) and
its metrics match, and `mlkit models card` renders with the executed notebook. A shared snapshot changed or removed
behind the run's back stops a reproduction in one line naming the version and the run, before anything runs. With
`share = no`, `track` uploads no raw rows."""
import json
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
from conftest import REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill


def _checkout(root, db, share="yes"):
    "A teammate's project: the repo's notebooks, the team's store, a state folder of its own (`root/state`, empty)."
    ini = write_project(root)
    ini.write_text(ini.read_text() + f"[tracking]\nuri = sqlite:///{db}\nshare = {share}\n")
    return project_env(ini)


def _py(code, env, cwd):
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout


def _runs(env, cwd) -> int:
    return int(_py("import mlkit.tracking as t; c = t.mlflow().MlflowClient(); "
                   "print(len(c.search_runs([c.get_experiment_by_name('penguins').experiment_id])))", env, cwd))


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    "Alice's penguins run on the team's store, promoted: its run id, dataset version and where its snapshot is, locally and shared."
    top = tmp_path_factory.mktemp("team")
    db, store = top / "store" / "mlflow.db", top / "store" / "artifacts"
    store.mkdir(parents=True)
    alice = _checkout(top / "alice", db)
    # the experiment's artifacts outside every state folder: what a server's `--artifacts-destination` gives a team
    _py(f"import mlflow; mlflow.MlflowClient('sqlite:///{db}').create_experiment('penguins', artifact_location={store.as_uri()!r})", alice, top)
    r = mlkit("train", "penguins", "-f", REPO / "nbs/train/penguins.yaml", env=alice, cwd=top, check=True)
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    mlkit("models", "promote", "penguins", env=alice, cwd=top, check=True)
    tags = json.loads(_py(f"import json, mlkit.tracking as t; print(json.dumps(t.mlflow().MlflowClient().get_run('{run_id}').data.tags))", alice, top))
    dv = tags["mlkit.dataset_version"]
    return {"top": top, "db": db, "alice": alice, "run_id": run_id, "dv": dv, "tags": tags,
            "local": top / "alice" / "state" / "snapshots" / f"{dv[7:]}.parquet",
            "remote": store / run_id / "artifacts" / "data" / "snapshot" / f"{dv[7:]}.parquet"}


def test_the_run_keeps_its_snapshot_and_notebook_in_the_artifact_store(team):
    local, remote, run_id = team["local"], team["remote"], team["run_id"]
    assert oct(local.stat().st_mode & 0o777) == "0o400"  # raw rows: the owner's only
    assert remote.is_file() and remote.read_bytes() == local.read_bytes()
    assert json.loads(remote.with_suffix(".json").read_text())["id"] == team["dv"]
    assert team["tags"]["mlkit.snapshot.artifact"] == f"data/snapshot/{team['dv'][7:]}.parquet"
    assert (remote.parents[2] / "notebook" / f"{run_id}.ipynb").is_file()  # the executed notebook, logged as before
    assert not (team["top"] / "mlruns").exists() and not (REPO / "mlruns").exists()


def test_a_teammate_reproduces_from_an_empty_state_folder(team):
    bob, top = _checkout(team["top"] / "bob", team["db"]), team["top"]
    mine = top / "bob" / "state" / "snapshots" / f"{team['dv'][7:]}.parquet"
    assert not mine.exists()
    r = mlkit("reproduce", team["run_id"], "--json", env=bob, cwd=top)
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["matches"] and rep["data_ok"] and rep["metric_diffs"] == {}, (r.stdout, r.stderr[-3000:])
    assert mine.read_bytes() == team["local"].read_bytes() and oct(mine.stat().st_mode & 0o777) == "0o400"
    assert [p.name for p in mine.parent.iterdir() if p.name.startswith(".fetch-")] == []  # the private download folder is gone
    tags = json.loads(_py(f"import json, mlkit.tracking as t; print(json.dumps(t.mlflow().MlflowClient().get_run('{rep['new_run_id']}').data.tags))", bob, top))
    assert tags["mlkit.dataset_version"] == team["dv"] and tags["mlkit.reproduces"] == team["run_id"]


def test_a_teammate_renders_the_card(team):
    bob, top = _checkout(team["top"] / "carol", team["db"]), team["top"]
    out = top / "carol" / "card.html"
    r = mlkit("models", "card", "penguins", "-o", out, env=bob, cwd=top)
    assert r.returncode == 0 and "version 1" in r.stdout, (r.stdout, r.stderr[-3000:])
    page = out.read_text()
    assert team["run_id"] in page and team["dv"] in page and "pipeline.prepare(" in page  # the executed notebook, from the artifact store
    assert "<p>not logged</p>" not in page
    assert not (top / "carol" / "state" / "snapshots").exists() or not any((top / "carol" / "state" / "snapshots").iterdir())


def test_a_teammate_gate_scores_on_the_shared_snapshot(team):
    "The gate of a teammate whose state folder is empty fetches the run's snapshot to score both versions on."
    erin, top = _checkout(team["top"] / "erin", team["db"]), team["top"]
    away = team["local"].parent.with_name("snapshots-away")  # the path the run recorded is alice's: not on erin's machine
    team["local"].parent.rename(away)
    try: rows = _py("import mlkit.config, mlkit.gate as g, mlkit.tracking as t; s = mlkit.config.current_settings(); "
                    f"print(g._snapshot_of(s, t.mlflow().MlflowClient().get_run('{team['run_id']}')).height)", erin, top)
    finally: away.rename(team["local"].parent)
    assert int(rows) == 344  # the penguins the run snapshotted, from the shared copy
    mine = top / "erin" / "state" / "snapshots" / f"{team['dv'][7:]}.parquet"
    assert mine.read_bytes() == team["local"].read_bytes() and oct(mine.stat().st_mode & 0o777) == "0o400"


@pytest.mark.parametrize("harm", ["tampered", "missing"])
def test_a_changed_or_missing_shared_snapshot_fails_closed(team, harm):
    top, remote, dv, run_id = team["top"], team["remote"], team["dv"], team["run_id"]
    dave = _checkout(top / f"dave-{harm}", team["db"])
    before, kept = _runs(dave, top), remote.read_bytes()
    try:
        if harm == "tampered":
            os.chmod(remote, 0o600)
            df = pl.read_parquet(remote)
            df.with_columns(pl.col(df.columns[-1]).shift(1)).write_parquet(remote)
        else: shutil.move(remote, remote.with_suffix(".gone"))
        r = mlkit("reproduce", run_id, env=dave, cwd=top)
    finally:
        if remote.with_suffix(".gone").exists(): shutil.move(remote.with_suffix(".gone"), remote)
        os.chmod(remote, 0o600); remote.write_bytes(kept); os.chmod(remote, 0o400)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    why = "does not verify" if harm == "tampered" else "is not in the run's artifacts"
    assert f"data version {dv} of run {run_id}" in lines[0] and why in lines[0] and "nothing was run" in lines[0], lines[0]
    snaps = top / f"dave-{harm}" / "state" / "snapshots"
    assert not snaps.exists() or list(snaps.iterdir()) == []  # nothing half-fetched is left to be trusted later
    assert _runs(dave, top) == before  # no run started


def test_nothing_raw_is_uploaded_unless_shared(tmp_path, clean_environ):
    "`prepare` and `track` of penguins on one store: share = no logs no snapshot and no tag; share = yes logs both."
    import mlkit.config
    from mlkit import data, pipeline, tracking
    seen = {}
    for share in ("no", "yes"):
        env = _checkout(tmp_path / share, tmp_path / "mlflow.db", share)
        os.environ.clear(); os.environ.update(env)
        s = mlkit.config.configure()
        tracking.mlflow(s).MlflowClient().get_experiment_by_name("penguins") or tracking.mlflow(s).MlflowClient().create_experiment(
            "penguins", artifact_location=(tmp_path / "artifacts").as_uri())
        p = pipeline.prepare("penguins", data.penguins_path())
        run = pipeline.track(p, {"epochs": 1})
        tracking.end_run()
        client = tracking.mlflow(s).MlflowClient()
        seen[share] = ([f.path for f in client.list_artifacts(run.info.run_id, "data/snapshot")],
                       client.get_run(run.info.run_id).data.tags.get("mlkit.snapshot.artifact"))
    hexid = p.snapshot.id[7:]
    assert seen["no"] == ([], None), seen
    assert seen["yes"] == ([f"data/snapshot/{hexid}.json", f"data/snapshot/{hexid}.parquet"], f"data/snapshot/{hexid}.parquet"), seen
    assert [f.name for f in (tmp_path / "artifacts").rglob("*.parquet")] == [f"{hexid}.parquet"]  # the shared run's, only
