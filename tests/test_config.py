"""Settings: precedence, typed values, errors that name file/section/key, and the tools pointed at the state folder."""
import subprocess
import sys

import pytest
from conftest import BIN, REPO, mlkit, project_env, write_project

from mlkit.config import SettingsError, configure, load_settings


def test_precedence_argument_env_file_default(tmp_path):
    ini = write_project(tmp_path)
    ini.write_text(ini.read_text() + "[serve]\nport = 4100\nworkers = 2\n")
    s = load_settings(ini, env={"MLKIT_SERVE__WORKERS": "5", "MLKIT_SERVE__HOST": "::1"}, serve={"host": "localhost"})
    assert (s.serve.port, s.serve.workers, s.serve.host, s.serve.ready_timeout) == (4100, 5, "localhost", 120.0)
    assert s.sources[("serve", "port")] == str(ini)
    assert s.sources[("serve", "host")] == "argument"
    assert s.state_dir == (tmp_path / "state").resolve()


def test_model_settings_precedence(tmp_path):
    "Per model: argument > MLKIT_MODEL_<NAME>__<SECTION>_<KEY> > [model.NAME] > MLKIT_<SECTION>__<KEY> > [section] > default."
    ini = write_project(tmp_path)
    ini.write_text(ini.read_text() + "[gate]\nmetric = test_accuracy\nmargin = 0.1\nfloors = test_accuracy>=0.5\n"
                   "[model.diabetes]\ngate.metric = test_rmse\ngate.direction = min\ngate.margin = 1\n"
                   "[model.my-model]\nsplit.strategy = time\nsplit.column = day\n")
    layers = {"MLKIT_GATE__MARGIN": "0.2", "MLKIT_MODEL_DIABETES__GATE_MARGIN": "3"}
    s = load_settings(ini, env=layers)
    d, p = s.for_model("diabetes"), s.for_model("penguins")
    assert (d.gate.metric, d.gate.direction, d.gate.margin, d.gate.floors) == ("test_rmse", "min", 3.0, "test_accuracy>=0.5")
    assert (p.gate.metric, p.gate.direction, p.gate.margin) == ("test_accuracy", "", 0.2)  # the project's, env over file
    # (an empty direction follows the metric: `mlkit.gate.resolve`)
    assert d.sources[("gate", "margin")] == "environment variable MLKIT_MODEL_DIABETES__GATE_MARGIN"
    assert d.sources[("gate", "metric")] == f"{ini} [model.diabetes]"
    assert load_settings(ini, env={}).for_model("diabetes").gate.margin == 1.0  # [model.NAME] over [gate] and its env
    assert load_settings(ini, env={"MLKIT_GATE__MARGIN": "0.2"}).for_model("diabetes").gate.margin == 1.0
    assert load_settings(ini, env=layers, gate={"margin": 9}).for_model("diabetes").gate.margin == 9  # an argument wins
    assert s.for_model("my-model").split.strategy == "time" and s.for_model("my_model").split.column == "day"
    assert s.gate.metric == "test_accuracy" and s.model is None and d.model == "diabetes"


@pytest.mark.parametrize("text,env,message", [
    ("[model.diabetes]\ngate.metrc = x\n", {}, "[model.diabetes] gate.metrc: no per-model setting"),
    ("[model.diabetes]\nserve.port = 1\n", {}, "[model.diabetes] serve.port: no per-model setting"),
    ("[model.diabetes]\ngate.direction = lower\n", {}, "[gate] direction = 'lower' must be max or min"),
    ("", {"MLKIT_MODEL_DIABETES__GATE_MARGN": "1"}, "MLKIT_MODEL_DIABETES__GATE_MARGN: [model.diabetes] gate_margn"),
    ("", {"MLKIT_MODEL_DIABETES__SPLIT_TEST_SIZE": "2"}, "environment variable MLKIT_MODEL_DIABETES__SPLIT_TEST_SIZE: [split] test_size = '2'"),
])
def test_bad_model_settings_fail_at_load_naming_where(tmp_path, text, env, message):
    ini = write_project(tmp_path)
    ini.write_text(ini.read_text() + text)
    with pytest.raises(SettingsError) as e: load_settings(ini, env=env)
    assert message in str(e.value), str(e.value)


def test_settings_found_from_a_subfolder(tmp_path, monkeypatch):
    ini = write_project(tmp_path)
    (tmp_path / "nbs" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "nbs" / "train")
    s = load_settings(env={})
    assert s.file == ini.resolve() and s.state_dir == (tmp_path / "state").resolve()


@pytest.mark.parametrize("body,message", [
    ("[serve]\nport = lots\n", "[serve] port = 'lots' is not a valid int"),
    ("[serve]\nport = 70000\n", "[serve] port = '70000' must be a port number"),
    ("[telemetry]\ndisabled = perhaps\n", "[telemetry] disabled = 'perhaps' is not a boolean"),
    ("[serve]\nprot = 1\n", "[serve] prot: unknown key"),
    ("[srve]\nport = 1\n", "unknown section [srve]"),
])
def test_bad_value_is_one_line_naming_file_section_key(tmp_path, body, message):
    ini = tmp_path / "settings.ini"
    ini.write_text(body)
    with pytest.raises(SettingsError) as e: load_settings(ini, env={})
    assert str(ini) in str(e.value) and message in str(e.value)
    r = mlkit("env", env=project_env(ini))
    assert r.returncode == 2, r
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ini) in lines[0] and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_environment_value_names_the_variable(tmp_path):
    ini = write_project(tmp_path)
    r = mlkit("env", env={**project_env(ini), "MLKIT_SERVE__PORT": "http"})
    assert r.returncode == 2 and "environment variable MLKIT_SERVE__PORT: [serve] port = 'http'" in r.stderr


def test_env_exports_point_tools_at_state(tmp_path):
    ini = write_project(tmp_path)
    r = mlkit("env", env=project_env(ini), check=True)
    state = (tmp_path / "state").resolve()
    assert f"export MLFLOW_TRACKING_URI=sqlite:///{state}/mlflow.db" in r.stdout
    assert f"export BENTOML_HOME={state}/bentoml" in r.stdout
    assert "export MLFLOW_DISABLE_TELEMETRY=true" in r.stdout and "export BENTOML_DO_NOT_TRACK=true" in r.stdout
    # the exports work for plain tools: a bash that evals them sees the same store
    out = subprocess.run(["bash", "-c", f"eval \"$({BIN}/mlkit env)\"; echo $MLFLOW_TRACKING_URI"],
                         env=project_env(ini), capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"sqlite:///{state}/mlflow.db"


def test_nothing_lands_in_home_or_cwd(tmp_path, clean_environ):
    "A process started elsewhere with mlkit configured writes MLflow and BentoML state only into the state folder."
    ini = write_project(tmp_path / "proj")
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir(); home.mkdir()
    code = ("import mlkit.tracking as t; mlf = t.mlflow(); eid = t.experiment_id('probe')\n"
            "with mlf.start_run(experiment_id=eid): mlf.log_text('hello', 'a.txt')\n"
            "import bentoml; bentoml.models.list()")
    env = {**project_env(ini), "HOME": str(home)}
    subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True)
    assert list(elsewhere.iterdir()) == [], list(elsewhere.iterdir())
    assert not (home / "bentoml").exists()
    assert (tmp_path / "proj" / "state" / "mlflow.db").is_file()
    assert list((tmp_path / "proj" / "state" / "mlartifacts" / "probe").rglob("a.txt"))


def test_configure_sets_tool_environment(tmp_path, clean_environ):
    import os
    ini = write_project(tmp_path)
    s = configure(load_settings(ini, env={}))
    assert os.environ["BENTOML_HOME"] == str(s.bentoml_home) and s.bentoml_home.is_dir()
    assert os.environ["MLFLOW_TRACKING_URI"] == s.tracking_uri


def test_repo_settings_file_is_valid_and_documented():
    s = load_settings(REPO / "settings.ini", env={})
    assert s.state_dir == (REPO / ".mlkit").resolve()
    first = (REPO / "settings.ini").read_text().splitlines()[0]
    assert first.startswith("#") and "runtime settings" in first
    assert ".mlkit/" in (REPO / ".gitignore").read_text().splitlines()


def test_the_init_template_is_this_repos_settings_less_its_models():
    "`mlkit init` writes the settings.ini the wheel carries: this repo's, documented the same, less its [model.*] sections."
    from conftest import REPO
    from mlkit.project import TEMPLATES
    repo = (REPO / "settings.ini").read_text()
    template = (TEMPLATES / "settings.ini").read_text()
    assert template.count("package = {package}") == 1
    import re
    assert template.replace("package = {package}", "package =").replace("owner = {owner}", "owner = mlkit team") == repo[:re.search(r"^\[model\.", repo, re.M).start()]
