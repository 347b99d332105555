"""`mlkit demo`: the whole chain on a fresh embedded default, as `make demo` runs it, printing what it always printed."""
import json
import re
from pathlib import Path

import pytest
from conftest import mlkit, project_env, write_project

pytestmark = [pytest.mark.serve, pytest.mark.papermill]
# what the demo printed, masked: the same since the library was split into one module per concern, apart from the
# probabilities, which moved once when training runs got a validation split apart from the test rows (issue 15)
DEMO_STDOUT = Path(__file__).parent / "fixtures" / "demo_stdout.txt"


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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    "`mlkit demo` on a fresh project."
    tmp_path = tmp_path_factory.mktemp("demo")
    ini = write_project(tmp_path)
    r = mlkit("demo", env=project_env(ini), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"root": tmp_path, "env": project_env(ini), "stdout": r.stdout}


def test_demo_end_to_end(demo):
    out, tmp_path = demo["stdout"], demo["root"]
    for line in ["registered model  penguins version 1 (challenger)", "promoted          penguins version 1 -> champion (gate: not_retired, contract, loaded_back, held_out",
                 "POST /predict     200", "server stopped"]:
        assert line in out, out
    assert masked(out) == masked(DEMO_STDOUT.read_text()), out  # ids, times and paths masked
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


def readme_flow() -> list[str]:
    "The `mlkit` commands of the README's flow, as written (comments dropped)."
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## The flow", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("mlkit ")]


def test_readme_flow_runs_as_written_after_the_demo(demo):
    "After `make demo`, the README's train and promote lines run as written: metrics printed, the gate's verdict shown."
    import shlex
    flow = readme_flow()
    train, promote = flow[0], next(c for c in flow if c.startswith("mlkit models promote"))
    assert train == "mlkit train penguins -p epochs=30" and promote == "mlkit models promote penguins", flow
    r = mlkit(*shlex.split(train)[1:], env=demo["env"], check=True)
    assert re.search(r"^test metrics: test_accuracy [\d.]+, test_log_loss", r.stdout, re.M), r.stdout
    assert "registered penguins version 2 as challenger" in r.stdout
    r = mlkit(*shlex.split(promote)[1:], env=demo["env"])
    verdict = r.stdout if r.returncode == 0 else r.stderr
    assert "penguins version 2 vs champion 1: gate" in verdict and "beats_champion: test_accuracy" in verdict, verdict
    if r.returncode == 0: assert "penguins version 2 is now champion" in r.stdout
    else:  # refused: the way to accept it anyway is printed, and works as printed
        assert r.returncode == 1 and 'mlkit models promote penguins 2 --force --reason "why"' in r.stderr, r.stderr
        forced = mlkit("models", "promote", "penguins", "2", "--force", "--reason", "readme flow test", env=demo["env"], check=True)
        assert "penguins version 2 is now champion (forced)" in forced.stdout
