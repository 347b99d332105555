"""`mlkit demo`: the whole chain on a fresh embedded default, as `make demo` runs it."""
import json
import re

import pytest
from conftest import mlkit, project_env, write_project

pytestmark = [pytest.mark.serve, pytest.mark.papermill]


def test_demo_end_to_end(tmp_path):
    ini = write_project(tmp_path)
    r = mlkit("demo", env=project_env(ini), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for line in ["registered model  penguins version 1 (challenger)", "promoted          penguins version 1 -> champion (gate: not_retired, contract",
                 "POST /predict     200", "server stopped"]:
        assert line in out, out
    body = json.loads(re.search(r"^POST /predict     200\n(\{.*?^\})", out, re.S | re.M).group(1))
    assert body["model"] == "penguins" and body["version"] == "1" and len(body["predictions"]) == 2
    assert body["predictions"][0]["label"] in {"Adelie", "Chinstrap", "Gentoo"}
    state = tmp_path / "state"
    assert (state / "mlflow.db").is_file() and list((state / "bentoml" / "bentos" / "penguins").iterdir())
    assert list((state / "runs" / "penguins").glob("*.html"))
    # the server was stopped right after answering: its shutdown wrote the queued rows to the prediction log
    from mlkit.predlog import read_prediction_log
    logged = read_prediction_log(state / "predictions" / "penguins")
    assert len(logged) == 2 and logged["prediction"].to_list() == [p["label"] for p in body["predictions"]]
