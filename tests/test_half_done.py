"""Training runs that are cut short finish or fail, never hang: `mlkit train` killed at each stage (`MLKIT_FAULT`: in the
kernel after the run is tracked, after everything is logged, mid-registration), or killed from outside while it trains,
or starved by a disk that fills. After it, the next mlkit command finds no run left RUNNING, no version registered, no
kernel still running, and no temporary folder of the run left behind."""
import errno
import inspect
import json
import os
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest
from conftest import MLKIT, REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.papermill

TINY = REPO / "nbs" / "train" / "penguins.yaml"


def _store(env) -> dict:
    "The runs (status, mlkit.error) and registered versions of the project, read through mlkit (so the reaper runs first)."
    code = ("import json, mlkit.tracking as t; c = t.mlflow().MlflowClient(); ids = [e.experiment_id for e in c.search_experiments()];"
            "runs = c.search_runs(ids) if ids else [];"
            "print(json.dumps({'runs': [{'id': r.info.run_id, 'status': r.info.status, 'error': r.data.tags.get('mlkit.error')} for r in runs],"
            "'versions': [v.version for v in c.search_model_versions()]}))")
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def _kernels(run_ids) -> list:
    "Processes still running for any of `run_ids` (a kernel carries its run's id in `MLFLOW_RUN_ID`)."
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MLFLOW_RUN_ID") in run_ids and p.status() != psutil.STATUS_ZOMBIE: out.append(p)
        except psutil.Error: pass
    return out


def _wait_training(db, proc, timeout=240):
    "Wait until the run logged its first epoch (the kernel is in the training loop), reading the SQLite store directly."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                if con.execute("select count(*) from metrics where key = 'train_loss'").fetchone()[0]: return
        except sqlite3.Error: pass
        time.sleep(0.3)
    raise AssertionError("training did not start")


def _nothing_left(root, tmp, env):
    "After the next command: no RUNNING run, nothing registered, no kernel, no scratch folder, nothing in TMPDIR."
    store = _store(env)
    assert store["runs"] and all(r["status"] == "FAILED" for r in store["runs"]), store
    assert store["versions"] == [], store
    assert not _kernels({r["id"] for r in store["runs"]})
    assert not list((root / "state" / "tmp").iterdir()) if (root / "state" / "tmp").exists() else True
    assert not list(tmp.iterdir()), list(tmp.iterdir())
    return store


def _register_has_its_fault() -> bool:
    from mlkit import registry
    return 'fault("register")' in inspect.getsource(registry.register)


@pytest.mark.parametrize("stage", ["notebook", "logged", "register"])
def test_killed_at_each_stage_the_next_command_fails_the_run(tmp_path, stage):
    if stage == "register" and not _register_has_its_fault(): pytest.skip("registry.register has no `register` fault point yet")
    root, tmp = tmp_path / "proj", tmp_path / "tmp"
    tmp.mkdir()
    env = {**project_env(write_project(root)), "TMPDIR": str(tmp)}
    r = mlkit("train", "penguins", "-f", TINY, env={**env, "MLKIT_FAULT": stage})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr[-2000:])  # the kernel's fault point killed its runner too
    mlkit("models", "history", "penguins", env=env, check=True)  # any next command
    store = _nothing_left(root, tmp, env)
    (run,) = store["runs"]
    assert run["error"].startswith("abandoned: its process (pid ") and "is gone; marked FAILED by pid" in run["error"], run


def test_a_killed_runner_takes_its_kernel_with_it(tmp_path):
    "kill -9 of `mlkit train` mid-training: the kernel exits (ipykernel polls its parent) and registers nothing."
    root, tmp = tmp_path / "proj", tmp_path / "tmp"
    tmp.mkdir()
    env = {**project_env(write_project(root)), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([MLKIT, "train", "penguins", "-p", "epochs=100000", "-p", "patience=None"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_training(root / "state" / "mlflow.db", proc)
        kernels = psutil.Process(proc.pid).children(recursive=True)
        assert kernels
    finally:
        proc.kill()
        proc.communicate()
    gone, alive = psutil.wait_procs(kernels, timeout=60)
    assert not alive, alive  # not left training (and registering) on its own
    mlkit("models", "history", "penguins", env=env, check=True)
    (run,) = _nothing_left(root, tmp, env)["runs"]
    assert f"pid {proc.pid} on" in run["error"], run


def _mount_tmpfs(where, size="64m") -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try: return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0
    except OSError: return False


def _fill(folder):
    "Write into `folder` until the disk is full."
    with open(folder / "filler", "wb") as f:
        try:
            while True: f.write(bytes(1 << 20)); f.flush(); os.fsync(f.fileno())
        except OSError as e: assert e.errno == errno.ENOSPC, e


def test_a_disk_that_fills_during_training_fails_the_run_in_one_line(tmp_path):
    root = tmp_path / "proj"
    state = root / "state"
    if not _mount_tmpfs(state): pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        env = project_env(write_project(root))
        proc = subprocess.Popen([MLKIT, "train", "penguins", "-p", "epochs=100000", "-p", "patience=None"], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_training(state / "mlflow.db", proc)
            _fill(state)
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None: proc.kill(); proc.communicate()
        assert proc.returncode == 1, (out, err[-3000:])
        said = [ln for ln in err.splitlines() if ln.startswith("mlkit train:")]
        assert "Traceback" not in err and len(said) == 1, err[-3000:]
        assert "No space left on device" in said[0] or "disk is full" in said[0], said
        # the disk still full: the runner recorded the end itself (in the room it had set aside), and registered nothing
        with sqlite3.connect(f"file:{state / 'mlflow.db'}?mode=ro", uri=True) as con:
            assert [s for (s,) in con.execute("select status from runs")] == ["FAILED"]
            assert con.execute("select count(*) from model_versions").fetchone()[0] == 0
        assert not list((state / "tmp").iterdir())
        (state / "filler").unlink()
        mlkit("models", "history", "penguins", env=env, check=True)
        store = _store(env)
        assert [r["status"] for r in store["runs"]] == ["FAILED"] and store["versions"] == []
        assert "No space left on device" in store["runs"][0]["error"] or "disk is full" in store["runs"][0]["error"], store
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)
