"""Training notebooks through papermill (real kernel) into a real MLflow SQLite store, and the registry."""
import json
import subprocess

import numpy as np
import pytest
from conftest import BIN, REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill


def test_train_records_run_params_metrics_notebook(trained, in_project):
    from mlkit.tracking import mlflow
    client = mlflow().MlflowClient()
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3" and run.data.params["hidden"] == "[8]"
    assert 0.5 < run.data.metrics["test_accuracy"] <= 1.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    tags = run.data.tags
    assert tags["mlkit.dataset_version"].startswith("sha256:") and tags["mlkit.feature_spec"].startswith("sha256:")
    assert tags["mlkit.notebook"] == "nbs/train/penguins.ipynb" and tags["mlkit.runner"] == "papermill"
    assert len(tags["mlflow.source.git.commit"]) == 40
    # who ran it (so a later command can tell when that process is gone), and the rows early stopping read
    assert tags["mlkit.runner.pid"].isdigit() and tags["mlkit.runner.host"] and float(tags["mlkit.runner.started"]) > 0
    assert tags["mlkit.fit.stopping_rows"] == "val"
    assert json.loads(tags["mlkit.papermill_parameters"]) == {"epochs": 3, "hidden": [8], "batch_size": 64, "model_name": "penguins"}
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
    assert arts == {f"notebook/{trained['run_id']}.ipynb", f"notebook/{trained['run_id']}.html"}
    executed = json.loads((trained["state"] / "runs" / "penguins" / f"{trained['run_id']}.ipynb").read_text())
    import re
    page = (trained["state"] / "runs" / "penguins" / f"{trained['run_id']}.html").read_text()
    assert "<script" not in page and not re.findall(r'(?:src|href)="(?:https?:)?//', page)  # opens offline
    assert "injected-parameters" in page or "epochs = 3" in page
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "epochs = 3" in "".join(injected[0]["source"])
    # the data: checked contract, dataset version as an MLflow input, profile and feature spec as artifacts
    assert tags["mlkit.contract_passed"] == "true" and tags["mlkit.dataset_rows"] == "344"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == f"penguins@{tags['mlkit.dataset_version'].split(':')[1][:12]}"
    assert {i.key: i.value for i in inp.tags}["mlflow.data.context"] == "training"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "data")} | {a.path for a in client.list_artifacts(run.info.run_id, "features")}
    assert names == {"data/contract.json", "data/contract_report.json", "data/profile.json", "data/split.json",
                     "features/spec.json", "features/task.json"}
    assert tags["mlkit.split.strategy"] == "stratified" and tags["mlkit.task"] == "classification"
    assert {k: int(tags[f"mlkit.split.rows.{k}"]) for k in ("train", "val", "test")} == {"train": 223, "val": 52, "test": 69}
    snap = trained["state"] / "snapshots" / (tags["mlkit.dataset_version"].split(":")[1] + ".parquet")
    assert snap.is_file() and tags["mlkit.snapshot"] == str(snap)
    # everything landed in the state folder, nothing in the repo
    assert (trained["state"] / "mlflow.db").is_file() and (trained["state"] / "mlartifacts" / "penguins").is_dir()


def test_registered_challenger_carries_bundle_hash(trained, in_project):
    from mlkit.models import bundle_sha256
    from mlkit.registry import download_bundle, get_version
    mv = get_version("penguins", alias="challenger")
    assert mv.run_id == trained["run_id"]
    path, _ = download_bundle("penguins", alias="challenger")
    assert mv.tags["mlkit.bundle_sha256"] == bundle_sha256(path)
    lineage = json.loads((path / "lineage.json").read_text())
    assert lineage["mlflow_run_id"] == trained["run_id"] and lineage["dataset_version"].startswith("sha256:")


def test_mlflow_pyfunc_and_mlkit_predict_the_same(trained, in_project, tmp_path):
    import pandas as pd
    from mlkit.data import load_penguins
    from mlkit.registry import download_bundle
    from mlkit.predictor import Predictor
    from mlkit.tracking import mlflow
    cols = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex"]
    rows = load_penguins().select(cols).to_dicts()  # includes rows with missing values
    model = mlflow().pyfunc.load_model("models:/penguins@challenger")
    frame = pd.DataFrame(rows, columns=cols).astype({c: "float64" for c in cols[1:5]})
    via_mlflow = model.predict(frame)
    path, mv = download_bundle("penguins", alias="challenger")
    via_mlkit = Predictor.from_bundle(path).predict_proba(rows)
    np.testing.assert_allclose(via_mlflow[[f"p_{c}" for c in ["Adelie", "Chinstrap", "Gentoo"]]].to_numpy(), via_mlkit, atol=1e-6)
    assert list(via_mlflow["label"]) == [["Adelie", "Chinstrap", "Gentoo"][i] for i in via_mlkit.argmax(1)]
    # the logged model holds no pickle: the python model is source code
    # a copy: from a local store MLflow returns the store's own folder when no destination is given (changing it would
    # change the registered version every later test of this project serves)
    local = mlflow().artifacts.download_artifacts(f"models:/penguins/{mv.version}", dst_path=str(tmp_path))
    from pathlib import Path
    files = [p.name for p in Path(local).rglob("*") if p.is_file()]
    assert "pyfunc_model.py" in files and not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    # a bundle changed in the artifact store is refused when MLflow loads the model (its hash is in the model's config)
    metrics = next(Path(local).rglob("bundle/metrics.json"))
    metrics.write_text(metrics.read_text().replace("{", '{"planted": 1, ', 1))
    with pytest.raises(ValueError, match="does not match the expected sha256:"): mlflow().pyfunc.load_model(local)


def test_unknown_parameter_is_one_line_listing_valid_names(trained):
    r = mlkit("train", "penguins", "-p", "epocs=2", env=trained["env"])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown parameter epocs" in r.stderr and "valid: model_name, epochs, lr" in r.stderr


def test_failing_notebook_marks_run_failed_and_registers_nothing(trained, in_project):
    from mlkit.tracking import mlflow
    client = mlflow().MlflowClient()
    before = {v.version for v in client.search_model_versions("name='penguins'")}
    r = mlkit("train", "penguins", "-p", "epochs=0", env=trained["env"])
    assert r.returncode == 1
    assert "epochs=0: must be >= 1" in r.stderr
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    assert client.get_run(run_id).info.status == "FAILED"
    assert (trained["state"] / "runs" / "penguins" / f"{run_id}.ipynb").is_file()
    assert {a.path for a in client.list_artifacts(run_id, "notebook")} == {f"notebook/{run_id}.ipynb", f"notebook/{run_id}.html"}
    assert {v.version for v in client.search_model_versions("name='penguins'")} == before


def test_plain_papermill_from_a_shell(tmp_path):
    "`papermill nbs/train/penguins.ipynb out.ipynb -p epochs 1` works with the venv's python3 kernel."
    ini = write_project(tmp_path / "proj")
    env = project_env(ini)
    out = tmp_path / "out.ipynb"
    r = subprocess.run(["bash", "-c", f"papermill nbs/train/penguins.ipynb {out} -p epochs 1 -y 'hidden: [4]'"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())["metadata"]["kernelspec"]["name"] == "python3"
    assert "registered penguins version 1 as challenger" in out.read_text()
    assert (tmp_path / "proj" / "state" / "mlflow.db").is_file()
    assert not (REPO / "nbs" / "train" / "mlflow.db").exists()


def test_promote_unknown_version_is_one_line(trained):
    r = mlkit("models", "promote", "penguins", "99", env=trained["env"])
    assert r.returncode == 2 and "99" in r.stderr and "Traceback" not in r.stderr


def test_ui_serves_the_embedded_store_on_loopback(trained):
    import os
    import signal
    import time
    import urllib.request

    from mlkit.deploy import free_port
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlkit"), "ui", "--port", str(port)], env=trained["env"], cwd=trained["root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, "mlkit ui exited"
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
                with urllib.request.urlopen(url, timeout=3) as r: body = json.loads(r.read())
            except OSError: time.sleep(0.5)
        assert body is not None, "MLflow UI did not answer"
        assert "penguins" in [e["name"] for e in body["experiments"]]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


FEATURES = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex"]  # the notebook's


def test_early_stopping_reads_the_validation_rows_only(trained, in_project):
    """The run's per-epoch `val_loss` is the loss on the validation rows (recomputed here from the same seed and split),
    never the test rows'; training stopped on it, kept the best epoch's weights, and the test rows judged them once."""
    from mlkit import models, pipeline, train
    from mlkit.data import penguins_path
    from mlkit.tracking import mlflow
    r = mlkit("train", "penguins", "-p", "epochs=40", "-p", "lr=0.05", "-p", "hidden=[8]", "-p", "patience=2",
              "-p", "register=false", env=trained["env"], check=True)
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    client = mlflow().MlflowClient()
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    p = pipeline.prepare("penguins", penguins_path(), features=FEATURES, seed=0)
    assert client.get_run(run_id).data.tags["mlkit.split.test_rows_sha256"] == p.split.record["test_rows_sha256"]
    train.seed_everything(0)
    module = models.build_model(models.model_config(models.TabularMLP, n_features=p.X_train.shape[1], n_classes=3, hidden=[8], dropout=0.1))
    on_test = []
    history = train.fit(module, p.X_train, p.y_train, p.X_val, p.y_val, epochs=40, lr=0.05, batch_size=32, seed=0,
                        loss_fn=p.task.loss, patience=2, progress=False,
                        on_epoch=lambda e, m: on_test.append(train.evaluate(module, p.X_test, p.y_test)["loss"]))
    epochs = len(history)
    assert epochs < 40 and sorted(logged) == list(range(1, epochs + 2)), (epochs, sorted(logged))  # it stopped early
    val = [h["val_loss"] for h in history]
    assert np.allclose([logged[e] for e in range(1, epochs + 1)], val, rtol=1e-5, atol=1e-6)  # the validation rows'
    assert not np.allclose(val, on_test, rtol=1e-3)  # and not the test rows'
    assert abs(logged[epochs + 1] - min(val)) < 1e-5  # the final val_loss is the best epoch's: its weights were kept
    run = client.get_run(run_id).data.metrics
    assert abs(run["test_loss"] - train.evaluate(module, p.X_test, p.y_test)["loss"]) < 1e-5


PII_EMAILS = [f"person{i}@example.org" for i in range(240)]


def test_no_pii_value_reaches_what_a_run_logs(tmp_path, clean_environ):
    """A contract's pii column as a feature (a keyed hash): none of its raw values is in the run's artifacts, the logged
    model (its input example) or the bundle. The load-back check scored raw rows in a private folder, now gone."""
    import os
    from pathlib import Path

    import polars as pl
    import mlkit.config
    from mlkit import models, pipeline, train
    from mlkit.tracking import mlflow
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "customers.contract.yaml").write_text(
        "name: customers\nlabel: churned\ncolumns:\n  email: {dtype: string, unique: true, pii: true, encode: hash}\n"
        "  age: {dtype: int, min: 18, max: 99}\n  plan: {dtype: string, categories: [basic, pro]}\n"
        "  churned: {dtype: string, categories: ['no', 'yes']}\n")
    n = len(PII_EMAILS)
    pl.DataFrame({"email": PII_EMAILS, "age": [18 + i % 70 for i in range(n)], "plan": ["basic", "pro"] * (n // 2),
                  "churned": ["no", "no", "yes"] * (n // 3)}).write_csv(tmp_path / "customers.csv")
    ini = write_project(tmp_path / "proj")
    ini.write_text(ini.read_text().replace(f"train_dir = {REPO / 'nbs' / 'train'}", f"train_dir = {tmp_path / 'train'}"))
    os.environ.clear()
    os.environ.update({**project_env(ini), "MLKIT_FEATURE_KEY": "a-test-key-of-32-bytes-0123456789"})
    settings = mlkit.config.configure()
    p = pipeline.prepare("customers", tmp_path / "customers.csv", features=["email", "age", "plan"])
    pipeline.track(p, {"epochs": 2})
    config = models.model_config(models.TabularMLP, n_features=p.X_train.shape[1], n_classes=p.task.n_outputs, hidden=[4])
    module = models.build_model(config)
    history = train.fit(module, p.X_train, p.y_train, p.X_val, p.y_val, epochs=2, loss_fn=p.task.loss, device="cpu", progress=False)
    done = pipeline.finish(p, module, config, history)
    mlf = mlflow()
    (tmp_path / "run").mkdir(); (tmp_path / "model").mkdir()  # each its own folder: tmp_path holds the raw CSV
    where = [Path(mlf.artifacts.download_artifacts(run_id=done.run_id, dst_path=str(tmp_path / "run"))),
             Path(mlf.artifacts.download_artifacts(done.model_uri, dst_path=str(tmp_path / "model"))), done.bundle]
    files = [f for w in where for f in w.rglob("*") if f.is_file()]
    assert any(f.name == "input_example.json" for f in files) and any(f.name == "features.json" for f in files)
    leaks = {str(f): e for f in files for e in PII_EMAILS if e.encode() in f.read_bytes()}
    assert leaks == {}, leaks
    example = json.loads(next(f for f in files if f.name == "input_example.json").read_text())
    assert {r[example["columns"].index("email")] for r in example["data"]} == {"<pii>"}, example
    assert not list(done.bundle.parent.glob("mlkit-loadback-*"))  # the raw rows' folder is gone
    assert done.bundle.parent.parent == settings.state_dir / "tmp"
