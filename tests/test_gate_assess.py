"""`mlkit.gate.assess`: real trainings of penguins (papermill, MLflow SQLite store) judged on the rows both versions held
out, with the paired bootstrap: a clearly better model promotes, noise and a tie do not, versions split with other
seeds are scored on the rows neither trained on, and a run whose fit stopped on the test rows is refused."""
import json
import os
import shutil

import numpy as np
import pytest
from conftest import REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill

POOR = ["-p", "epochs=1", "-p", "lr=0.001", "-p", "hidden=[4]"]  # test accuracy 0.36
MID = ["-p", "epochs=3", "-p", "hidden=[8]"]  # 0.85-0.92 by seed: seeds disagree on a few rows


def _train_dir(root):
    """The repo's training folder, its penguins notebook able to early-stop on the test rows (`-p stop_on=test`);
    `mlkit.pipeline.finish` tags every run with the rows its fit stopped on (`mlkit.train.held_out_check`)."""
    dst = root / "train"
    shutil.copytree(REPO / "nbs" / "train", dst)
    nb = json.loads((dst / "penguins.ipynb").read_text())
    text = lambda c: "".join(c["source"])
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    params["source"] = text(params) + '\nstop_on = "val"  # the rows fit early-stops on: val, or test (what the gate refuses)'
    fit = next(c for c in nb["cells"] if "train.fit(" in text(c))
    assert "p.X_val, p.y_val, epochs" in text(fit), "the penguins notebook's fit call changed: update this test"
    fit["source"] = text(fit).replace("p.X_val, p.y_val, epochs", '*((p.X_test, p.y_test) if stop_on == "test" else (p.X_val, p.y_val)), epochs')
    (dst / "penguins.ipynb").write_text(json.dumps(nb))
    return dst


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    ini = write_project(root)
    # half the rows for the test: rows enough that two splits share ~80 test rows
    ini.write_text(ini.read_text().replace(f"train_dir = {REPO / 'nbs' / 'train'}", f"train_dir = {_train_dir(root)}")
                   + "[split]\ntest_size = 0.5\n[gate]\nmetric = test_accuracy\n")
    env = project_env(ini)
    for args, extra in [(POOR, {}), (MID + ["-p", "seed=2"], {}), (MID, {}),  # v1, v2, v3
                        (MID, {"MLKIT_SPLIT__SEED": "1"}), (MID + ["-p", "stop_on=test"], {})]:  # v4: another split; v5
        mlkit("train", "penguins", *args, env={**env, **extra}, check=True)
    return {"ini": ini, "env": env, "state": root / "state"}


@pytest.fixture
def gate(project, clean_environ):
    "`assess` in this process against the project, as the registry will call it."
    import mlkit.config
    from mlkit.gate import assess
    from mlkit.registry import download_bundle
    os.environ.clear()
    os.environ.update(project["env"])
    settings = mlkit.config.configure()
    fetch = lambda n, v, dst: download_bundle(n, version=v, dst=dst)
    return lambda version, champion, s=None: assess("penguins", version, champion, s or settings, fetch)


def checks(res) -> dict: return {c.name: c.passed for c in res.checks}


def test_a_clearly_better_model_promotes_on_the_same_test_rows(gate):
    res = gate("2", "1")
    assert res.passed, res.summary()
    assert checks(res) == {"not_retired": True, "contract": True, "loaded_back": True, "held_out": True, "beats_champion": True, "significance": True}
    from mlkit.registry import get_version
    from mlkit.tracking import mlflow
    tags = mlflow().MlflowClient().get_run(get_version("penguins", version="2").run_id).data.tags
    p = res.paired
    assert p["rows"] == int(tags["mlkit.split.rows.test"]) and p["rows_sha256"] == tags["mlkit.split.test_rows_sha256"]  # both runs' own test rows
    assert p["rescored"] is None and p["resamples"] == 1000 and p["lower_bound"] > 0.4 and p["gain"] > p["lower_bound"]
    assert f"on the {p['rows']} test rows both held out (the same split) (per-row correctness)" in res.checks[-1].detail
    assert json.loads(json.dumps(res.to_dict()))["paired"] == p  # what the ledger keeps: small, JSON
    assert not gate("1", "2").passed  # and never the other way round


def test_noise_within_the_interval_does_not_promote(gate, project):
    res = gate("3", "2")  # another seed: a better logged accuracy, on a few rows each way
    assert checks(res)["beats_champion"] and not checks(res)["significance"] and not res.passed, res.summary()
    assert res.paired["gain"] > 0 > res.paired["lower_bound"]
    from mlkit.config import load_settings
    no_resampling = gate("3", "2", load_settings(project["ini"], env={"MLKIT_GATE__BOOTSTRAP": "0"}))
    assert no_resampling.passed and "no resampling ([gate] bootstrap = 0): the gain itself beats margin 0.0" in no_resampling.checks[-1].detail


def test_the_same_weights_registered_twice_tie_and_a_tie_never_promotes(gate):
    from mlkit.registry import get_version, register
    v3 = get_version("penguins", version="3")
    v6 = register(v3.source, "penguins", v3.run_id, v3.tags["mlkit.bundle_sha256"])
    res = gate(str(v6.version), "3")
    assert not res.passed and checks(res)["beats_champion"] is False and checks(res)["significance"] is False, res.summary()
    assert res.paired["gain"] == 0.0 and res.paired["lower_bound"] == 0.0


def _test_rows(df, record):
    from mlkit.splits import split
    return split(df, record["strategy"], record["test_size"], record["val_size"], record["seed"], record["column"]).test


def test_versions_split_with_other_seeds_are_scored_on_the_rows_both_held_out(gate, project):
    from mlkit.pipeline import _score_records
    from mlkit.registry import fetched_bundle, get_version
    from mlkit.snapshots import content_hash, load_snapshot
    from mlkit.tracking import mlflow
    res = gate("4", "1")
    assert res.passed, res.summary()
    mlf = mlflow()
    runs = {v: get_version("penguins", version=v).run_id for v in ("4", "1")}
    records = {v: mlf.artifacts.load_dict(f"runs:/{r}/data/split.json") for v, r in runs.items()}
    assert records["4"]["seed"] == 1 and records["1"]["seed"] == 0
    df = load_snapshot(mlf.MlflowClient().get_run(runs["4"]).data.tags["mlkit.dataset_version"], project["state"] / "snapshots")
    mine, theirs = _test_rows(df, records["4"]), _test_rows(df, records["1"])
    both = mine.join(theirs, on=df.columns, how="semi", nulls_equal=True)  # in version 1's test rows: neither trained nor validated on
    assert 30 <= len(both) < len(mine)
    assert res.paired["rows"] == len(both) and res.paired["rows_sha256"] == content_hash(both.sort(df.columns, nulls_last=True), 1)  # as split records hash
    assert (f"on {len(both)} rows held out by both (version 4's {len(mine)} test rows less the {len(mine) - len(both)} version 1 "
            "trained or validated on)") in res.checks[-2].detail
    accuracy = {}
    for v in ("4", "1"):  # each bundle scored on those rows by another road: raw records, as the load-back check does
        with fetched_bundle("penguins", version=v) as (path, _):
            out, classes = _score_records(path, both.drop("species").to_dicts()), json.loads((path / "task.json").read_text())["classes"]
        accuracy[v] = float((np.array(classes)[out.argmax(1)] == both["species"].to_numpy()).mean())
    assert res.paired["rescored"] == pytest.approx([accuracy["4"], accuracy["1"]], abs=1e-12)
    assert res.paired["gain"] == pytest.approx(accuracy["4"] - accuracy["1"], abs=1e-12)


def test_a_run_whose_fit_stopped_on_the_test_rows_is_refused(gate):
    from mlkit.registry import get_version
    from mlkit.tracking import mlflow
    assert mlflow().MlflowClient().get_run(get_version("penguins", version="5").run_id).data.tags["mlkit.fit.stopping_rows"] == "test"
    for champion in (None, "1"):  # better than the champion or not, with no champion at all
        res = gate("5", champion)
        assert not res.passed and [c.name for c in res.checks if not c.passed] == ["held_out"], res.summary()
        assert "early-stopped on the test rows" in res.checks[3].detail and res.checks[3].detail.endswith("--force and a reason")


def test_without_the_snapshot_nothing_is_re_scored_and_nothing_promotes(gate, project):
    snaps = project["state"] / "snapshots"
    moved = snaps.with_name("snapshots.away")
    snaps.rename(moved)
    try: res = gate("2", "1")
    finally: moved.rename(snaps)
    assert not res.passed and "is not in" in res.checks[-1].detail and "removed by retention?" in res.checks[-1].detail
    assert [c.name for c in res.checks][-1] == "beats_champion" and not res.paired
