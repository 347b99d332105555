"""Regression beside classification, end to end: the diabetes pipeline (a real papermill run, the gate on RMSE, a real
`bentoml serve` over HTTP, the prediction log, /metrics, the OpenAPI page, the card, monitoring with injected drift of a
feature and of the predictions, late labels giving live RMSE), with the penguins classifier in the same project under
its own gate."""
import datetime as dt
import os
import json
import re
import time
import urllib.request

import numpy as np
import polars as pl
import pytest
from conftest import REPO, mlkit, project_env, write_project

pytestmark = [pytest.mark.serve, pytest.mark.papermill]

MODEL_SETTINGS = """[monitor]
min_rows = 200
window = 1d
[model.diabetes]
gate.metric = test_rmse
gate.direction = min
gate.floors = test_r2>=0.2
card.purpose = Predict the progression of diabetes a year after baseline.
card.owner = clinic analytics
monitor.rmse_ceiling = 80
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "One project, two models: diabetes (regression, gated on RMSE) and penguins (classification, gated on accuracy)."
    root = tmp_path_factory.mktemp("two-models")
    ini = write_project(root)
    ini.write_text(ini.read_text() + MODEL_SETTINGS)
    env = project_env(ini)
    d = mlkit("train", "diabetes", "-f", REPO / "nbs/train/diabetes.yaml", env=env, check=True)
    p = mlkit("train", "penguins", "-f", REPO / "nbs/train/penguins.yaml", env=env, check=True)
    return {"root": root, "ini": ini, "env": env, "state": root / "state", "diabetes": d.stdout, "penguins": p.stdout}


@pytest.fixture
def configured(project, clean_environ):
    import os

    import mlkit.config
    os.environ.clear()
    os.environ.update(project["env"])
    return mlkit.config.configure()


def _run_id(stdout: str) -> str: return stdout.split("run ", 1)[1].split(":", 1)[0]


def test_a_regression_run_records_its_task_split_and_metrics(project, configured):
    from mlkit.registry import download_bundle
    from mlkit.tracking import mlflow
    out = project["diabetes"]
    assert re.search(r"^test metrics: .*test_rmse \d", out, re.M) and "test_accuracy" not in out, out
    assert re.search(r"^validation metrics: .*val_rmse \d", out, re.M), out
    run = mlflow().MlflowClient().get_run(_run_id(out))
    m, t = run.data.metrics, run.data.tags
    assert {"test_rmse", "test_mae", "test_r2", "test_loss", "val_rmse", "val_mae", "val_r2", "test_rmse.sex.1", "test_mae.sex.2"} <= set(m)
    assert not any("accuracy" in k for k in m)
    assert 40 < m["test_rmse"] < 70 and m["test_r2"] > 0.2, m  # the tiny run learns: the spread of the target is 77
    assert t["mlkit.task"] == "regression" and t["mlkit.split.strategy"] == "random"
    rows = {k: int(t[f"mlkit.split.rows.{k}"]) for k in ("train", "val", "test")}
    assert rows == {"train": 288, "val": 66, "test": 88}, rows  # 20% and 15% of 442, exactly
    path, _ = download_bundle("diabetes", alias="challenger")
    task = json.loads((path / "task.json").read_text())
    assert task["kind"] == "regression" and task["targets"] == ["progression"] and 130 < task["mean"][0] < 175
    assert json.loads((path / "lineage.json").read_text())["split"]["test_rows_sha256"] == t["mlkit.split.test_rows_sha256"]
    contract = json.loads((path / "contract.json").read_text())
    assert "patient" not in contract["columns"] and contract["task"] == "regression"  # the key is no feature


def test_one_project_two_models_two_gates(project):
    env = project["env"]
    r = mlkit("models", "promote", "diabetes", env=env, check=True)
    assert "floor test_r2>=0.2" in r.stdout and "no other champion; test_rmse" in r.stdout, r.stdout
    r = mlkit("models", "promote", "penguins", env=env, check=True)
    assert "floor" not in r.stdout and "no other champion; test_accuracy" in r.stdout, r.stdout  # the project's gate: no floors
    # a worse regression (higher RMSE) is refused on RMSE, lower being better, with the way to force it
    mlkit("train", "diabetes", "-f", REPO / "nbs/train/diabetes.yaml", "-p", "epochs=2", "-p", "lr=0.001", env=env, check=True)
    r = mlkit("models", "promote", "diabetes", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"FAIL beats_champion: test_rmse [\d.]+ vs champion v1 [\d.]+ \(lower is better", r.stderr), r.stderr
    assert 'mlkit models promote diabetes 2 --force --reason "why"' in r.stderr
    # the model's own environment variable wins over its [model.diabetes] section: with the floor and the direction
    # turned, the same version passes; the penguins' gate is untouched by either
    turned = {**env, "MLKIT_MODEL_DIABETES__GATE_DIRECTION": "max", "MLKIT_MODEL_DIABETES__GATE_FLOORS": ""}
    r = mlkit("models", "promote", "diabetes", env=turned, check=True)
    assert "higher is better" in r.stdout and "diabetes version 2 is now champion" in r.stdout
    mlkit("models", "rollback", "diabetes", "--reason", "the direction was turned for a test", env=env, check=True)
    r = mlkit("train", "penguins", "-f", REPO / "nbs/train/penguins.yaml", "-p", "epochs=1", "-p", "lr=0.0001", env=turned, check=True)
    r = mlkit("models", "promote", "penguins", env=turned)
    assert r.returncode == 1 and "FAIL beats_champion: test_accuracy" in r.stderr and "higher is better" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def served(project):
    "The diabetes champion built into a Bento and served by `bentoml serve` on 127.0.0.1."
    import os

    from mlkit.config import load_settings
    from mlkit.deploy import free_port, start_service, stop_service, wait_ready
    env = project["env"]
    mlkit("models", "promote", "diabetes", "1", env=env, check=True)  # whatever ran before: version 1 serves
    bento = mlkit("build", "diabetes", env=env, check=True).stdout.strip().splitlines()[-1]
    port, log = free_port(), project["root"] / "serve-diabetes.log"
    old = dict(os.environ)
    os.environ.update(env)
    try: proc = start_service(bento, port=port, settings=load_settings(project["ini"], env={}), log=log)
    finally: os.environ.clear(); os.environ.update(old)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        yield {"url": url, "bento": bento}
    finally:
        stop_service(proc)


def _post(url: str, rows: list, rid: str | None = None):
    from mlkit.demo import post_json
    return post_json(f"{url}/predict", {"rows": rows}, {"x-request-id": rid} if rid else None)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r: return r.read().decode()


def _sample(text: str, name: str, **labels) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def _rows(df: pl.DataFrame) -> list[dict]: return df.drop("patient", "progression").to_dicts()


def test_served_regression_answers_values_over_http(served, project, configured):
    from mlkit.data import load_diabetes
    from mlkit.predictor import Predictor
    from mlkit.registry import download_bundle
    rows = _rows(load_diabetes().head(3))
    before = _get(served["url"] + "/metrics")
    status, body, headers = _post(served["url"], rows, "reg-1")
    assert status == 200 and headers["x-mlkit-model"] == "diabetes/1", body
    assert all(set(p) == {"value"} and isinstance(p["value"], float) for p in body["predictions"]), body
    path, _ = download_bundle("diabetes", alias="champion")
    local = Predictor.from_bundle(path).predict(rows)
    assert all(abs(a["value"] - b["value"]) < 1e-6 for a, b in zip(body["predictions"], local))
    assert all(25 < p["value"] < 346 for p in body["predictions"])  # in the disease score's units, not standardized
    status, bad, _ = _post(served["url"], [{**rows[0], "bmi": "heavy"}])
    assert status == 422 and bad["field"] == "bmi"
    status, bad, _ = _post(served["url"], [{**rows[0], "patient": 7}])
    assert status == 422 and bad["field"] == "patient"  # the key is no input of the model
    after = _get(served["url"] + "/metrics")
    lab = {"model": "diabetes", "version": "1", "answered_by": "champion"}
    assert _sample(after, "mlkit_predicted_value_count", target="progression", **lab) - _sample(before, "mlkit_predicted_value_count", target="progression", **lab) == 3
    assert abs(_sample(after, "mlkit_predicted_value_sum", **lab) - _sample(before, "mlkit_predicted_value_sum", **lab) - sum(p["value"] for p in body["predictions"])) < 1e-6
    bounds = {float(b) for b in re.findall(r'mlkit_predicted_value_bucket\{[^}]*le="([^"]+)"[^}]*model="diabetes"', after) if b != "+Inf"}
    assert len(bounds) >= 8 and all(25 <= b <= 346 for b in bounds), bounds  # the deciles of the training target
    assert _sample(after, "mlkit_predicted_class_total", model="diabetes") == 0


def test_openapi_page_describes_values(served):
    doc = json.loads(_get(served["url"] + "/docs.json"))
    item = doc["components"]["schemas"]["PredictResponse"]["properties"]["predictions"]["items"]
    assert item["required"] == ["value"] and item["properties"]["value"]["type"] == "number", item
    assert "label" not in json.dumps(item) and "probabilities" not in json.dumps(item)
    fields = doc["components"]["schemas"]["PredictRequest"]["properties"]["rows"]["items"]["properties"]
    assert {"age", "sex", "bmi", "bp", "s1", "s6"} <= set(fields) and "progression" not in fields and "patient" not in fields


def _logged(state, ids: set, n: int, timeout: float = 30) -> pl.DataFrame:
    from mlkit.predlog import read_prediction_log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        df = read_prediction_log(state / "predictions" / "diabetes")
        if len(df) and df.filter(pl.col("request_id").is_in(list(ids))).height >= n: return df.filter(pl.col("request_id").is_in(list(ids)))
        time.sleep(0.3)
    raise AssertionError(f"{n} rows of {sorted(ids)[:3]}... not in the prediction log")


def _send(url: str, df: pl.DataFrame, prefix: str, size: int = 50) -> dict:
    "Serve `df` in requests of `size` rows; returns request id -> (rows' true progression, served values)."
    sent = {}
    for i in range(0, len(df), size):
        part, rid = df.slice(i, size), f"{prefix}-{i // size}"
        status, body, _ = _post(url, _rows(part), rid)
        assert status == 200, body
        sent[rid] = (part["progression"].to_list(), [p["value"] for p in body["predictions"]])
    return sent


def test_prediction_log_monitoring_and_late_labels(served, project, tmp_path):
    from mlkit.data import load_diabetes
    env, url, data = project["env"], served["url"], load_diabetes()
    calm_start = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat()
    calm = _send(url, data, "calm")
    logged = _logged(project["state"], set(calm), len(data))
    assert logged["prediction"].dtype == pl.Float64 and "p_" not in "".join(logged.columns)
    first = logged.filter(pl.col("request_id") == "calm-0").sort("row")
    assert np.allclose(first["prediction"].to_numpy(), calm["calm-0"][1])
    # calm traffic (the study's own patients): no feature and no prediction drifts
    labels = tmp_path / "labels.csv"
    pl.DataFrame([{"request_id": rid, "row": k, "label": y} for rid, (ys, _) in calm.items() for k, y in enumerate(ys)]).write_csv(labels)
    out = tmp_path / "calm.json"
    r = mlkit("monitor", "diabetes", "--since", calm_start, "--labels", labels, "-o", out, env=env)
    rep = json.loads(out.read_text())
    assert r.returncode == 0 and not rep["alert"], (rep["alerts"], r.stdout, r.stderr)
    assert rep["outputs"][0]["kind"] == "number" and rep["outputs"][0]["psi"] < 0.1
    # late labels give live RMSE and MAE: the same numbers as the served values against the truth
    y = np.array([v for ys, _ in calm.values() for v in ys])
    p = np.array([v for _, ps in calm.values() for v in ps])
    perf = rep["performance"]
    assert perf["labelled_rows"] == len(data) and abs(perf["rmse"] - np.sqrt(((p - y) ** 2).mean())) < 1e-6
    assert abs(perf["mae"] - np.abs(p - y).mean()) < 1e-6 and perf["r2"] is not None
    assert re.search(r"live rmse [\d.]+, mae [\d.]+, r2 [-\d.]+ on 442 labelled rows", r.stdout), r.stdout
    # a tighter ceiling for this model alone: the same labels now break it
    r = mlkit("monitor", "diabetes", "--since", calm_start, "--labels", labels, env={**env, "MLKIT_MODEL_DIABETES__MONITOR_RMSE_CEILING": "20"})
    assert r.returncode == 1 and re.search(r"live RMSE [\d.]+ > ceiling 20", r.stdout), r.stdout
    # drift injected upstream: BMI up by 8 and the triglycerides (s5) up by 0.8, strong predictors both: the feature
    # drifts and so do the predicted values
    drift_start = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat()
    drifted = _send(url, data.with_columns(pl.col("bmi") + 8, pl.col("s5") + 0.8), "drift")
    _logged(project["state"], set(drifted), len(data))
    out = tmp_path / "drift.json"
    r = mlkit("monitor", "diabetes", "--since", drift_start, "-o", out, "--html", tmp_path / "drift.html", env=env)
    rep = json.loads(out.read_text())
    assert r.returncode == 1 and rep["alert"], rep["alerts"]
    assert any(a.startswith("bmi: PSI") for a in rep["alerts"]) and any(a.startswith("s5: PSI") for a in rep["alerts"])
    assert any(a.startswith("prediction: distribution of values PSI") for a in rep["alerts"]), rep["alerts"]
    assert np.mean([v for _, ps in drifted.values() for v in ps]) > p.mean() + 20  # the predictions did move
    page = (tmp_path / "drift.html").read_text()
    assert "PSI predictions" in page and "prediction" in page


def test_the_card_shows_a_regression(served, project, tmp_path):
    out = tmp_path / "card.html"
    mlkit("models", "card", "diabetes@champion", "-o", out, env=project["env"], check=True)
    page = out.read_text()
    assert "Predict the progression of diabetes a year after baseline." in page and "clinic analytics" in page
    assert "Task: regression: predicts the value of progression." in page and "Split: random" in page
    assert "test_rmse" in page and "<h3>sex</h3>" in page and "rmse" in page.split('id="slices"')[1]
    assert "Classify penguin" not in page and "test_accuracy" not in page


def test_mlkit_serve_prints_where_and_stops_on_sigterm(served, project):
    """`mlkit serve` in the foreground says where it serves (reusing the version's Bento) and SIGTERM stops it with its
    workers. Served beside the diabetes service from the same project, the penguins service keeps its metrics apart."""
    import signal
    import subprocess

    from conftest import MLKIT

    from mlkit.demo import post_json
    from mlkit.deploy import free_port, wait_ready
    mlkit("models", "promote", "penguins", "1", env=project["env"], check=True)
    port = free_port()
    proc = subprocess.Popen([MLKIT, "serve", "penguins", "--port", str(port)], env=project["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        row = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}
        assert post_json(url + "/predict", {"rows": [row]})[0] == 200
        assert _post(served["url"], _rows(__import__("mlkit.data").data.load_diabetes().head(1)))[0] == 200
        mine, theirs = _get(url + "/metrics"), _get(served["url"] + "/metrics")
        assert 'model="penguins"' in mine and 'model="diabetes"' not in mine
        assert 'model="diabetes"' in theirs and 'model="penguins"' not in theirs  # the first service's series survive the second's start
        proc.send_signal(signal.SIGTERM)  # to mlkit alone, as systemd or Docker would
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
    first = proc.stdout.read().splitlines()[0]
    assert re.fullmatch(rf"serving penguins:[a-z0-9]+ on {url} \(Ctrl-C or SIGTERM stops it\)", first), first
    with pytest.raises(OSError): urllib.request.urlopen(url + "/readyz", timeout=5)  # nothing serves on after mlkit
    r = mlkit("serve", "diabetes", "--port", str(port), "--bento", "nope:nothing", env=project["env"], timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Bento nope:nothing is not one mlkit build finished for 'diabetes': it is not in the BentoML store" in r.stderr


def test_a_copied_notebook_trains_under_its_own_name(tmp_path):
    """A user's own model in a folder of their own, from a copy of the diabetes notebook not yet renamed inside: `mlkit
    train sugar` trains and registers sugar (never diabetes), its run records the copied notebook, and the task's gate
    (test_rmse, lower is better) judges it with no gate settings at all."""
    import shutil
    train_dir = tmp_path / "my_train"
    train_dir.mkdir()
    shutil.copy(REPO / "nbs/train/diabetes.ipynb", train_dir / "sugar.ipynb")
    (train_dir / "sugar.contract.yaml").write_text((REPO / "nbs/train/diabetes.contract.yaml").read_text().replace("name: diabetes", "name: sugar"))
    ini = write_project(tmp_path)
    ini.write_text(ini.read_text().replace(f"train_dir = {REPO / 'nbs' / 'train'}", f"train_dir = {train_dir}"))
    env = project_env(ini)
    r = mlkit("train", "sugar", "-f", REPO / "nbs/train/diabetes.yaml", env=env, check=True)
    assert "registered sugar version 1 as challenger" in r.stdout and "diabetes" not in r.stdout, r.stdout
    r = mlkit("models", "lineage", "sugar@challenger", "--json", env=env, check=True)
    assert json.loads(r.stdout)[0]["notebook"].endswith("my_train/sugar.ipynb"), r.stdout
    r = mlkit("models", "promote", "sugar", env=env, check=True)
    assert "no other champion; test_rmse" in r.stdout and "floor" not in r.stdout, r.stdout
    assert mlkit("models", "lineage", "diabetes@champion", env=env).returncode != 0  # no diabetes model was made
