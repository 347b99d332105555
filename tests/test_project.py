"""A new user's own project, from a pip-installed mlkit: a wheel of this checkout installed (--no-deps) into a fresh
venv that reuses .venv's packages, then, in folders outside the repository, `mlkit init`, `mlkit new` for a regression
CSV and a classification CSV, train, promote, build, serve over HTTP, predict and monitor. The model is the project's
own `nn.Module` (the scaffold's `<package>/models.py`): it is served from a Bento started in another folder while the
project's package is moved away. An unloadable bundle and a class from a package not allowed are refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import REPO

pytestmark = [pytest.mark.papermill, pytest.mark.serve]

PACKAGE = "shop"


def _run(cmd, cwd, env, check=True, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _houses(n=400, seed=0) -> pl.DataFrame:
    "A regression: a house's price from its size, rooms, city and age (generated with a seed)."
    rng = np.random.default_rng(seed)
    sqft, rooms = rng.uniform(40, 250, n), rng.integers(1, 7, n)
    city = rng.choice(["north", "south", "east"], n)
    age = rng.uniform(0, 80, n)
    price = 2000 * sqft + 15000 * rooms + np.select([city == "north", city == "south"], [60000, -20000], 0) - 500 * age + rng.normal(0, 10000, n)
    return pl.DataFrame({"house_id": np.arange(1, n + 1), "sqft": sqft.round(1), "rooms": rooms, "city": city, "age": age.round(1),
                         "price": price.round(0)})


def _customers(n=400, seed=1) -> pl.DataFrame:
    "A classification: whether a customer churned (yes/no) from tenure, plan and spend (some spend missing)."
    rng = np.random.default_rng(seed)
    tenure, plan = rng.integers(1, 61, n), rng.choice(["basic", "plus", "pro"], n)
    spend = rng.gamma(2.0, 30.0, n)
    logit = 1.5 - 0.08 * tenure + np.select([plan == "basic", plan == "pro"], [0.8, -0.8], 0)
    churned = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return pl.DataFrame({"customer_id": np.arange(1000, 1000 + n), "tenure": tenure, "plan": plan,
                         "spend": [None if i % 17 == 0 else round(float(s), 2) for i, s in enumerate(spend)], "churned": churned})


def _post(url, rows, timeout=30):
    from mlkit.demo import post_json
    return post_json(f"{url}/predict", {"rows": rows}, timeout=timeout)


def _wait(url, proc, timeout=240):
    from mlkit.deploy import wait_ready
    return wait_ready(url, proc, timeout=timeout)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(60)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    "A fresh venv with mlkit's wheel installed --no-deps; .venv's packages reused (a .pth naming its site-packages)."
    d = tmp_path_factory.mktemp("wheel-venv")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", d / "dist", REPO], d, os.environ)
    (wheel,) = (d / "dist").glob("mlkit-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", d / "venv"], d, os.environ)
    py = d / "venv" / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], d, os.environ).stdout.strip())
    (site / "reuse-dot-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # .venv's packages, but not its editable mlkit
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], d, os.environ)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(PATH=f"{py.parent}{os.pathsep}{env.get('PATH', '')}", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    where = _run([py, "-c", "import mlkit; print(mlkit.__file__)"], d, env).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's mlkit, not the checkout's
    return {"py": py, "mlkit": py.parent / "mlkit", "env": env, "wheel": wheel, "venv_dir": d}


@pytest.fixture(scope="module")
def project(venv, tmp_path_factory):
    "`mlkit init`, two CSVs, `mlkit new` for each, then each trained, promoted and built, all with the wheel's mlkit."
    work = tmp_path_factory.mktemp("user-work")
    run = lambda *a, cwd=None, **kw: _run([venv["mlkit"], *a], cwd or work / PACKAGE, venv["env"], **kw)
    out = {"init": run("init", PACKAGE, cwd=work).stdout}
    root = work / PACKAGE
    (root / "data").mkdir()
    _houses().write_csv(root / "data" / "houses.csv")
    _customers().write_csv(root / "data" / "customers.csv")
    out["new"] = run("new", "prices", "--data", "data/houses.csv", "--label", "price").stdout + \
        run("new", "churn", "--data", "data/customers.csv", "--label", "churned").stdout
    for name in ("prices", "churn"):
        out[f"train-{name}"] = run("train", name, "-f", f"nbs/train/{name}.yaml").stdout
        out[f"promote-{name}"] = run("models", "promote", name).stdout
        out[f"bento-{name}"] = run("build", name).stdout.strip().splitlines()[-1]
    exports = run("env").stdout
    tool_env = dict(line[len("export "):].split("=", 1) for line in exports.splitlines() if line.startswith("export "))
    tool_env = {k: v.strip("'") for k, v in tool_env.items()}
    return {"root": root, "work": work, "run": run, "out": out, "tool_env": tool_env, **venv}


def test_init_and_new_write_a_project_that_trains_with_no_edit(project):
    root, out = project["root"], project["out"]
    for f in ("settings.ini", ".gitignore", f"{PACKAGE}/models.py", "nbs/train/prices.ipynb", "nbs/train/prices.contract.yaml",
              "nbs/train/prices.yaml", "bentos/prices/service.py", "nbs/train/churn.contract.yaml"):
        assert (root / f).is_file(), f
    assert "next: mlkit new NAME --data FILE --label COLUMN" in out["init"] and "review nbs/train/churn.contract.yaml" in out["new"]
    import yaml
    prices = yaml.safe_load((root / "nbs/train/prices.contract.yaml").read_text())
    churn = yaml.safe_load((root / "nbs/train/churn.contract.yaml").read_text())
    assert (prices["task"], prices["key"], prices["columns"]["city"]["categories"]) == ("regression", ["house_id"], ["east", "north", "south"])
    assert (churn["task"], churn["key"], churn["columns"]["churned"]["categories"]) == ("classification", ["customer_id"], ["no", "yes"])
    assert churn["columns"]["spend"]["nullable"] is True and "nullable" not in churn["columns"]["tenure"]
    assert "test metrics: test_loss" in out["train-prices"] and "test_rmse" in out["train-prices"]
    assert "registered prices version 1 as challenger" in out["train-prices"] and "test_accuracy" in out["train-churn"]
    assert "is now champion" in out["promote-prices"] and "is now champion" in out["promote-churn"]
    assert (root / "bentos/prices/service.py").read_text().strip().endswith('svc = bento_service("prices")')


def test_the_bento_packs_the_installed_mlkit_as_a_wheel_not_a_name_from_an_index(project):
    import yaml
    home = Path(project["tool_env"]["BENTOML_HOME"])
    tag = project["out"]["bento-prices"]
    bento = home / "bentos" / tag.replace(":", "/")
    reqs = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert not [r for r in reqs if r.split("=")[0].split("[")[0].strip().lower() == "mlkit"], reqs
    (wheel,) = (bento / "env" / "python" / "wheels").glob("mlkit-*.whl")
    assert wheel.name == project["wheel"].name
    import zipfile
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "mlkit/service.py" in names and "mlkit/templates/settings.ini" in names and any(n.endswith(".dist-info/RECORD") for n in names)
        commit = json.loads(z.read("mlkit/_source.json"))["commit"]
    labels = yaml.safe_load((bento / "bento.yaml").read_text())["labels"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels["mlkit_commit"] == commit and commit.split("-")[0] == head, (labels, commit)
    store = home / "models" / "prices"
    assert list(store.glob(f"*/bundle/code/{PACKAGE}/models.py")), "the bundle carries the project's model code"
    assert json.loads(next(store.glob("*/bundle/model.json")).read_text())["class"] == f"{PACKAGE}.models.Net"


def test_the_users_module_serves_from_a_bento_started_in_another_folder(project, tmp_path):
    "The project's package moved away: `bentoml serve TAG` elsewhere, mlflow.pyfunc.load_model elsewhere, both from the bundle's code."
    from mlkit.deploy import free_port
    root, py = project["root"], project["py"]
    env = {**project["env"], "BENTOML_HOME": project["tool_env"]["BENTOML_HOME"],
           "MLKIT_PROJECT__STATE_DIR": project["tool_env"]["MLKIT_PROJECT__STATE_DIR"]}
    rows = _houses().head(5).drop("price", "house_id").to_dicts()
    shutil.move(root / PACKAGE, root / f"{PACKAGE}.away")
    port, log = free_port(), open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([py, "-m", "bentoml", "serve", project["out"]["bento-prices"], "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, proc)
        status, body, _ = _post(url, rows)
        assert status == 200 and [set(p) for p in body["predictions"]] == [{"value"}] * 5, body
        assert all(50_000 < p["value"] < 1_000_000 for p in body["predictions"]), body
        status, body, _ = _post(url, [{**rows[0], "rooms": "many"}])
        assert status == 422 and body["field"] == "rooms", body
        code = ("import mlflow, pandas as pd, json, sys; m = mlflow.pyfunc.load_model('models:/prices@champion');"
                f"print(json.dumps(m.predict(pd.DataFrame({json.dumps(rows)}).astype({{'rooms': 'float64'}})).to_dict('list')))")  # numbers are doubles in its signature
        mlenv = {**env, "MLFLOW_TRACKING_URI": project["tool_env"]["MLFLOW_TRACKING_URI"]}
        out = json.loads(_run([py, "-c", code], tmp_path, mlenv).stdout.strip().splitlines()[-1])
        served = [p["value"] for p in _post(url, rows)[1]["predictions"]]
        assert np.allclose(out["value"], served, rtol=1e-5), (out, served)
    finally:
        _stop(proc)
        log.close()
        shutil.move(root / f"{PACKAGE}.away", root / PACKAGE)


def test_mlkit_serve_predict_and_monitor_the_classifier(project, tmp_path):
    from mlkit.deploy import free_port
    root, run = project["root"], project["run"]
    port, log = free_port(), open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([project["mlkit"], "serve", "churn", "--port", str(port)], cwd=root, env=project["env"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = _customers().head(40).drop("churned", "customer_id").to_dicts()
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, proc)
        status, body, _ = _post(url, rows)
        assert status == 200 and {p["label"] for p in body["predictions"]} <= {"yes", "no"}, body
        assert all(set(p["probabilities"]) == {"no", "yes"} for p in body["predictions"]), body
    finally:
        _stop(proc)
        log.close()
    r = run("predict", "churn@champion", "data/customers.csv", tmp_path / "scored.parquet")
    assert "400 rows scored by churn version 1" in r.stdout, r.stdout
    scored = pl.read_parquet(tmp_path / "scored.parquet")
    assert scored.height == 400 and set(scored["label"].unique()) <= {"yes", "no"} and "p_yes" in scored.columns
    r = run("monitor", "churn", check=False)
    assert r.returncode == 0 and "churn version 1: 40 rows" in r.stdout, (r.stdout, r.stderr)
    r = run("predict", "prices@champion", "data/houses.csv", tmp_path / "prices.parquet")
    assert "400 rows scored by prices version 1" in r.stdout


def _variant(root: Path, name: str, import_line: str):
    "A copy of the prices notebook and contract under another name, building its module from `import_line`."
    nb = (root / "nbs/train/prices.ipynb").read_text()
    assert f"from {PACKAGE}.models import Net" in nb
    nb = nb.replace(f"from {PACKAGE}.models import Net", import_line).replace('model_name = \\"prices\\"', f'model_name = \\"{name}\\"')
    (root / f"nbs/train/{name}.ipynb").write_text(nb)
    contract = (root / "nbs/train/prices.contract.yaml").read_text().replace("name: prices", f"name: {name}")
    (root / f"nbs/train/{name}.contract.yaml").write_text(contract)


def _versions(project, name: str) -> list:
    code = f"import mlflow; print(len(mlflow.MlflowClient().search_model_versions(\"name='{name}'\")))"
    env = {**project["env"], "MLFLOW_TRACKING_URI": project["tool_env"]["MLFLOW_TRACKING_URI"]}
    return int(_run([project["py"], "-c", code], project["root"], env).stdout.strip().splitlines()[-1])


def test_a_bundle_that_does_not_load_back_is_refused_before_registration(project):
    "The module imports a helper beside the package, not in it: it trains, but its bundle cannot rebuild it elsewhere."
    root = project["root"]
    (root / "helpers.py").write_text("SCALE = 1.0\n")
    (root / PACKAGE / "broken.py").write_text(f"import helpers  # outside the package: the bundle does not carry it\n"
                                             f"from {PACKAGE}.models import Net as _Net\n\n\nclass Net(_Net):\n    pass\n")
    _variant(root, "broken", f"from {PACKAGE}.broken import Net")
    r = project["run"]("train", "broken", "-f", "nbs/train/prices.yaml", check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "does not load in a fresh interpreter" in r.stderr and "No module named 'helpers'" in r.stderr, r.stderr
    assert _versions(project, "broken") == 0


def test_a_class_outside_the_allowed_packages_is_refused_naming_the_setting(project):
    root = project["root"]
    (root / "other").mkdir()
    (root / "other" / "__init__.py").write_text("")
    shutil.copy(root / PACKAGE / "models.py", root / "other" / "nets.py")
    _variant(root, "foreign", "from other.nets import Net")
    r = project["run"]("train", "foreign", "-f", "nbs/train/prices.yaml", check=False)
    assert r.returncode == 1 and "[project] model_packages" in r.stderr and "'other'" in r.stderr, r.stderr
    assert _versions(project, "foreign") == 0
    env = {**project["env"], "MLKIT_PROJECT__MODEL_PACKAGES": "other"}  # the setting allows it
    r = _run([project["mlkit"], "train", "foreign", "-f", "nbs/train/prices.yaml"], root, env)
    assert "registered foreign version 1" in r.stdout, r.stdout


def test_demo_runs_outside_a_project(project, tmp_path):
    "A pip-installed mlkit in an empty folder: `mlkit demo` makes its own project and answers over HTTP."
    r = _run([project["mlkit"], "demo"], tmp_path, project["env"], check=False)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "the demo runs in" in r.stdout and "POST /predict     200" in r.stdout, r.stdout
    assert (tmp_path / "mlkit-demo" / "settings.ini").is_file() and (tmp_path / "mlkit-demo" / "mlkit_demo" / "models.py").is_file()
