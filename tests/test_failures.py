"""Training runs that go wrong: a cell past the timeout, a killed kernel. Each marks the run FAILED, keeps the
executed notebook and registers nothing."""
import subprocess
import sys
import time

import psutil
import pytest
from conftest import MLKIT, REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill


def _registered(env) -> int:
    code = "import mlkit.tracking as t; print(len(t.mlflow().MlflowClient().search_model_versions()))"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def _run_status(env, run_id) -> str:
    code = f"import mlkit.tracking as t; print(t.mlflow().MlflowClient().get_run('{run_id}').info.status)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_cell_timeout_fails_the_run(tmp_path):
    env = {**project_env(write_project(tmp_path)), "MLKIT_RUNS__CELL_TIMEOUT": "4"}
    r = mlkit("train", "penguins", "-p", "epochs=100000", env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "timed out" in r.stderr.lower() or "timeout" in r.stderr.lower(), r.stderr
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    assert _run_status(env, run_id) == "FAILED"
    assert (tmp_path / "state" / "runs" / "penguins" / f"{run_id}.ipynb").is_file()
    assert _registered(env) == 0


def test_killed_kernel_fails_the_run(tmp_path):
    env = project_env(write_project(tmp_path))
    proc = subprocess.Popen([MLKIT, "train", "penguins", "-p", "epochs=100000"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kernel, deadline = None, time.monotonic() + 120
        while kernel is None and time.monotonic() < deadline:
            kids = psutil.Process(proc.pid).children(recursive=True)
            kernel = next((k for k in kids if "ipykernel_launcher" in " ".join(k.cmdline())), None)
            time.sleep(0.2)
        assert kernel is not None, "no kernel started"
        time.sleep(8)  # let it reach the training cell
        kernel.kill()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 1, out + err
    assert "dead" in err.lower() or "died" in err.lower(), err
    run_id = out.split("run ", 1)[1].split(":", 1)[0]
    assert _run_status(env, run_id) == "FAILED"
    assert (tmp_path / "state" / "runs" / "penguins" / f"{run_id}.ipynb").is_file()
    assert _registered(env) == 0
