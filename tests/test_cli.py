"""`mlkit.cli`: each command parses its arguments, calls one library function and prints; user mistakes are one line
on stderr with exit 2 (a failed check exit 1), never a traceback."""
import json

import pytest
from conftest import REPO, mlkit, project_env, write_project

CONTRACT = REPO / "nbs" / "train" / "penguins.contract.yaml"


@pytest.fixture
def env(tmp_path):
    return project_env(write_project(tmp_path))


def _penguins_csv(tmp_path, bad: bool = False):
    from mlkit.data import load_penguins
    df = load_penguins()
    if bad:
        import polars as pl
        df = df.with_columns(pl.when(pl.col("island") == "Dream").then(pl.lit("Atlantis")).otherwise(pl.col("island")).alias("island"))
    df.write_csv(path := tmp_path / ("bad.csv" if bad else "penguins.csv"))
    return path


def test_help_lists_every_command(env):
    out = mlkit("--help", env=env, check=True).stdout
    for c in ["env", "ui", "train", "predict", "reproduce", "models", "build", "serve", "deploy", "monitor", "gc", "data", "demo"]:
        assert f"    {c}" in out, (c, out)
    assert "promote" in mlkit("models", "--help", env=env, check=True).stdout


def test_data_check_exit_codes(env, tmp_path):
    r = mlkit("data", "check", _penguins_csv(tmp_path), "--contract", CONTRACT, env=env)
    assert r.returncode == 0 and "passed" in r.stdout
    r = mlkit("data", "check", _penguins_csv(tmp_path, bad=True), "--contract", CONTRACT, env=env)
    assert r.returncode == 1 and "column 'island': categories failed: 124 of 344 rows" in r.stderr
    r = mlkit("data", "check", tmp_path / "nope.csv", "--contract", CONTRACT, env=env)
    assert r.returncode == 2 and r.stderr.strip() == f"mlkit data check: {tmp_path / 'nope.csv'}: no such file"


def test_data_snapshot_and_profile(env, tmp_path):
    src = _penguins_csv(tmp_path)
    first = mlkit("data", "snapshot", src, env=env, check=True).stdout.strip()
    again = json.loads(mlkit("data", "snapshot", src, "--json", env=env, check=True).stdout)
    assert first.startswith("sha256:") and again["id"] == first and again["rows"] == 344
    r = mlkit("data", "profile", src, "-o", tmp_path / "p.json", "--contract", CONTRACT, env=env, check=True)
    assert "profile of 344 rows, 8 columns" in r.stdout and json.loads((tmp_path / "p.json").read_text())["rows"] == 344


@pytest.mark.parametrize("args,message", [
    (["train", "nope"], "mlkit train: no training notebook"),
    (["train", "penguins", "-p", "epochs"], "mlkit train: parameter 'epochs': expected key=value"),
    (["serve", "penguins", "--host", "0.0.0.0"], "mlkit serve: refusing to serve on 0.0.0.0 without API keys"),
    (["deploy", "penguins", "--host", "0.0.0.0"], "mlkit deploy: refusing to serve on 0.0.0.0 without API keys"),
    (["models", "card", "nope@champion"], "mlkit models: "),
])
def test_user_mistakes_are_one_line_and_exit_2(env, args, message):
    r = mlkit(*args, env=env)
    mine = [line for line in r.stderr.splitlines() if line.startswith("mlkit ")]  # (MLflow logs its own lines as it creates a store)
    assert r.returncode == 2 and len(mine) == 1 and mine[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_env_points_plain_tools_at_the_project(env, tmp_path):
    out = mlkit("env", env=env, check=True).stdout
    assert f"export MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'state'}/mlflow.db" in out and "export BENTOML_HOME=" in out


def test_deploy_stop_with_nothing_running(env):
    assert mlkit("deploy", "penguins", "--stop", env=env, check=True).stdout.strip() == "penguins: no local deployment is running"
