"""`mlkit demo`: the whole chain on a fresh embedded default, as `make demo` runs it, printing what it always printed."""
import json
import re
from pathlib import Path

import pytest
from conftest import mlkit, project_env, write_project

pytestmark = [pytest.mark.serve, pytest.mark.papermill]
BEFORE_SPLIT = Path(__file__).parent / "fixtures" / "pre_split" / "demo_stdout.txt"


def masked(out: str) -> str:
    "Demo output with what differs from run to run masked: ids, tags, ports, paths, seconds; probabilities to 5 digits."
    out = re.sub(r"\b[0-9a-f]{32}\b", "<id>", out)
    out = re.sub(r"penguins:[0-9a-z]{16}\b", "penguins:<tag>", out)
    out = re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:<port>", out)
    out = re.sub(r"sqlite:///\S+", "sqlite:///<path>", out)
    out = re.sub(r"(?<=[\s(])/[^\s),]+", "<path>", out)
    out = re.sub(r"\d+\.\d s\b", "<t> s", out)
    return re.sub(r"-?\d\.\d+(?:e-?\d+)?(?=,?\n)", lambda m: f"{float(m.group()):.5g}", out)


def test_masking_keeps_what_matters():
    a = "training run      0123456789abcdef0123456789abcdef (10.6 s)\nserving           http://127.0.0.1:52609 (ready in 4.3 s, log /x/y.log)\n"
    assert masked(a) == "training run      <id> (<t> s)\nserving           http://127.0.0.1:<port> (ready in <t> s, log <path>)\n"
    assert masked('        "Gentoo": 0.9999830722808838\n') == masked('        "Gentoo": 0.99998307\n') != masked('        "Gentoo": 0.9998\n')
    assert masked("registered model  penguins version 1\n") != masked("registered model  penguins version 2\n")


def test_demo_end_to_end(tmp_path):
    ini = write_project(tmp_path)
    r = mlkit("demo", env=project_env(ini), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for line in ["registered model  penguins version 1 (challenger)", "promoted          penguins version 1 -> champion (gate: not_retired, contract",
                 "POST /predict     200", "server stopped"]:
        assert line in out, out
    # the same output as before the library was split into one module per concern (ids, times, paths masked)
    assert masked(out) == masked(BEFORE_SPLIT.read_text()), out
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
