"""Tasks beyond the two worked pipelines, through every layer in-process: a regression with two targets and a binary
classifier of a true/false label (prepare, train, finish into a real MLflow store, then the Predictor, the served
answer, the OpenAPI schema of that answer, the prediction log and monitoring with late labels)."""
import asyncio
import json

import numpy as np
import polars as pl
import pytest
from conftest import write_project

from mlkit.contracts import Contract


@pytest.fixture
def project(tmp_path, clean_environ):
    import mlkit.config
    ini = write_project(tmp_path)
    return mlkit.config.configure(mlkit.config.load_settings(ini, env={}))


def _train(name: str, df: pl.DataFrame, contract: Contract, epochs: int = 30, lr: float = 0.02):
    "The pipeline of a training notebook, in-process: prepare, track, fit on train (validation for early stopping), finish."
    from mlkit import models, pipeline, train
    p = pipeline.prepare(name, f"{name}.parquet", contract=contract, data=df, seed=0)
    pipeline.track(p, {"epochs": epochs})
    train.seed_everything(0)
    config = models.model_config(models.TabularMLP, n_features=p.X_train.shape[1], n_classes=p.task.n_outputs, hidden=[16])
    module = models.build_model(config)
    history = train.fit(module, p.X_train, p.y_train, p.X_val, p.y_val, epochs=epochs, lr=lr, loss_fn=p.task.loss,
                        patience=5, device="cpu", progress=False)
    return p, pipeline.finish(p, module, config, history)


def _serve(predictor, rows: list[dict], settings):
    "One `/predict` answer of an in-process ModelServer (no prediction log): status and parsed body."
    from mlkit.service import ModelServer
    async def go():
        server = ModelServer(predictor, settings=settings, log=False)
        try: return await server.answer(rows, "t-1")
        finally: await server.aclose()
    status, _, body = asyncio.run(go())
    return status, json.loads(body)


def _valid(schema: dict, doc) -> bool:
    "Validate against an OpenAPI 3.0 schema (its `nullable` as JSON Schema's null type)."
    from jsonschema import Draft4Validator
    def conv(s):
        if isinstance(s, dict):
            out = {k: conv(v) for k, v in s.items() if k != "nullable"}
            return {"anyOf": [out, {"type": "null"}]} if s.get("nullable") else out
        return [conv(v) for v in s] if isinstance(s, list) else s
    return Draft4Validator(conv(schema)).is_valid(doc)


def test_a_regression_with_two_targets(project, tmp_path):
    from mlkit.data import load_penguins
    from mlkit.monitoring import monitor, read_labels
    from mlkit.openapi import response_schema
    from mlkit.predictor import Predictor
    from mlkit.predlog import PredictionLog, read_prediction_log
    base = Contract.load("nbs/train/penguins.contract.yaml")
    cols = ["species", "island", "sex", "bill_length_mm", "flipper_length_mm", "body_mass_g"]
    contract = Contract("sizes", {c: base.columns[c] for c in cols}, label=["flipper_length_mm", "body_mass_g"],
                        task="regression", slices=["island"])
    df = load_penguins().drop_nulls(["flipper_length_mm", "body_mass_g"]).select(cols)
    p, done = _train("sizes", df, contract)
    m = done.metrics
    assert {"test_rmse", "test_rmse.flipper_length_mm", "test_rmse.body_mass_g", "test_r2.body_mass_g", "val_mae"} <= set(m)
    assert m["test_r2.flipper_length_mm"] > 0.5 and m["test_r2.body_mass_g"] > 0.5, m  # species says much about both
    assert 100 < m["test_rmse.body_mass_g"] < 600 and m["test_rmse.flipper_length_mm"] < 10  # in each target's units
    assert sorted(done.slices["island"]) == ["Biscoe", "Dream", "Torgersen"]
    pred = Predictor.from_bundle(done.bundle, "sizes", "1")
    rows = df.drop("flipper_length_mm", "body_mass_g").head(4).to_dicts()
    status, body = _serve(pred, rows, project)
    assert status == 200 and set(body["predictions"][0]["value"]) == {"flipper_length_mm", "body_mass_g"}, body
    assert _valid(response_schema(pred.contract), body) and not _valid(response_schema(["a", "b"]), body)
    local = pred.predict_table(df.head(4))
    assert np.allclose(local["value_body_mass_g"].to_numpy(), [r["value"]["body_mass_g"] for r in body["predictions"]])
    log = PredictionLog(tmp_path / "log", pred.contract, flush_seconds=0.1)
    served = df.head(300)
    out = pred.predict_proba(served.drop("flipper_length_mm", "body_mass_g").to_dicts())
    for i in range(0, len(served), 50):
        log.log(served.slice(i, 50).drop("flipper_length_mm", "body_mass_g").to_dicts(), {"model": "sizes", "version": "1"},
                f"r{i}", proba=out[i:i + 50])
    log.close()
    logged = read_prediction_log(tmp_path / "log")
    assert {"prediction_flipper_length_mm", "prediction_body_mass_g"} <= set(logged.columns) and "prediction" not in logged.columns
    labels = tmp_path / "labels.csv"
    served.with_columns(request_id=pl.format("r{}", pl.int_range(pl.len()) // 50 * 50), row=pl.int_range(pl.len()) % 50).select(
        "request_id", "row", "flipper_length_mm", "body_mass_g").write_csv(labels)
    rep = monitor(logged, json.loads((done.bundle / "profile.json").read_text()), pred.contract, project,
                  labels=read_labels(labels, pred.contract))
    perf = rep["performance"]
    truth = served.select("flipper_length_mm", "body_mass_g").to_numpy()
    assert perf["labelled_rows"] == 300 and abs(perf["rmse.body_mass_g"] - np.sqrt(((out[:, 1] - truth[:, 1]) ** 2).mean())) < 1e-6
    assert [d["column"] for d in rep["outputs"]] == ["prediction_flipper_length_mm", "prediction_body_mass_g"]
    with pytest.raises(ValueError, match="needs columns request_id and flipper_length_mm, body_mass_g"):
        (tmp_path / "bad.csv").write_text("request_id,label\nr0,1\n")
        read_labels(tmp_path / "bad.csv", pred.contract)


def test_a_binary_classifier_of_a_true_false_label(project, tmp_path):
    from mlkit.contracts import synthetic_contract
    from mlkit.data import synthetic
    from mlkit.monitoring import monitor
    from mlkit.openapi import response_schema
    from mlkit.predictor import Predictor
    from mlkit.predlog import PredictionLog, read_prediction_log
    contract = synthetic_contract()
    assert contract.kind == "classification" and contract.columns["churned"]["dtype"] == "bool"
    p, done = _train("churn", synthetic(4000, seed=1), contract, epochs=10, lr=0.01)
    m = done.metrics
    assert p.split.record["strategy"] == "stratified" and p.task.classes == [False, True]
    assert {"test_accuracy", "test_macro_f1", "test_log_loss", "test_roc_auc", "val_roc_auc"} <= set(m), m
    assert 0.6 < m["test_roc_auc"] <= 1.0, m  # the label depends on age, sessions, score and plan
    pred = Predictor.from_bundle(done.bundle, "churn", "1")
    rows = synthetic(5, seed=2).drop("churned", "id").to_dicts()
    status, body = _serve(pred, rows, project)
    assert status == 200 and all(r["label"] in (True, False) and set(r["probabilities"]) == {"false", "true"} for r in body["predictions"]), body
    assert _valid(response_schema(pred.contract), body)
    log = PredictionLog(tmp_path / "log", pred.contract, flush_seconds=0.1)
    served = synthetic(600, seed=3)
    out = pred.predict_proba(served.drop("churned", "id").to_dicts())
    log.log(served.drop("churned", "id").to_dicts(), {"model": "churn", "version": "1"}, "r", proba=out, labels=pred.labels(out))
    log.close()
    logged = read_prediction_log(tmp_path / "log")
    assert {"p_False", "p_True", "prediction"} <= set(logged.columns)
    rep = monitor(logged, json.loads((done.bundle / "profile.json").read_text()), pred.contract, project)
    assert not rep["alert"] and rep["outputs"][0]["psi"] < 0.1, rep["alerts"]  # another seed of the same data: no drift
