"""Shared fixtures: a throwaway mlkit project (settings + state folder in tmp) over the repo's notebooks and services."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLKIT = str(BIN / "mlkit")


def write_project(root: Path) -> Path:
    "A settings.ini in `root` whose state lives in `root/state` and whose notebooks and services are the repo's."
    root.mkdir(parents=True, exist_ok=True)
    ini = root / "settings.ini"
    ini.write_text(f"# mlkit's runtime settings (test project)\n[project]\nstate_dir = state\n"
                   f"train_dir = {REPO / 'nbs' / 'train'}\nbentos_dir = {REPO / 'bentos'}\n"
                   f"[runs]\ncell_timeout = 600\n")
    return ini


def project_env(ini: Path) -> dict:
    "The environment of a process working on the test project: only MLKIT_SETTINGS points at it."
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
    env.update(MLKIT_SETTINGS=str(ini), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    return env


def mlkit(*args, env: dict, cwd=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    "Run the installed `mlkit` command."
    r = subprocess.run([MLKIT, *map(str, args)], env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"mlkit {' '.join(map(str, args))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture
def clean_environ():
    "Restore os.environ and mlkit's configured settings after an in-process test that calls `configure`."
    import mlkit.config
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    mlkit.config._configured = None


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    "A test project where `mlkit train penguins -f nbs/train/penguins.yaml` has run once (real papermill kernel)."
    root = tmp_path_factory.mktemp("project")
    ini = write_project(root)
    env = project_env(ini)
    r = mlkit("train", "penguins", "-f", REPO / "nbs/train/penguins.yaml", env=env, check=True)
    run_id = r.stdout.split("run ", 1)[1].split(":", 1)[0]
    return {"root": root, "ini": ini, "env": env, "state": root / "state", "run_id": run_id, "stdout": r.stdout}


@pytest.fixture
def in_project(trained, clean_environ):
    "mlkit configured in this process against the trained test project."
    import mlkit.config
    os.environ.clear()
    os.environ.update(trained["env"])
    return mlkit.config.configure()


def jdump(x) -> str: return json.dumps(x, indent=1, default=str)


def champion_bento(env: dict) -> str:
    "penguins promoted to champion (already it when another module promoted it first) and its Bento built: the Bento's tag."
    mlkit("models", "promote", "penguins", env=env)
    return mlkit("build", "penguins", env=env, check=True).stdout.strip().splitlines()[-1]


def corrupt_model(trained: dict, label: str) -> tuple[dict, str]:
    """penguins version 1 imported into BentoML as version `label` with one byte of its weights flipped (its SHA-256 no
    longer matches the one recorded at registration): the environment of BentoML's tools and the model's tag."""
    from mlkit.config import load_settings, tool_env
    env = {**trained["env"], **tool_env(load_settings(trained["ini"], env={}))}
    code = ("import bentoml, pathlib\nfrom mlkit.registry import download_bundle\nfrom mlkit.bento import import_bundle\n"
            f"p, _ = download_bundle('penguins', version='1')\ntag = import_bundle(p, 'penguins', '{label}')\n"
            "f = pathlib.Path(bentoml.models.get(tag).path) / 'bundle' / 'model.safetensors'\n"
            "b = bytearray(f.read_bytes()); b[-1] ^= 1; f.write_bytes(bytes(b))\nprint(tag)\n")
    return env, subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def bento_served(bento: str, ini: Path, env: dict, log: Path, extra_env: dict | None = None):
    "A real `bentoml serve` of `bento` for the project of `ini` (its environment `env`) on 127.0.0.1: yields (url, port), stops it after."
    from mlkit.config import load_settings
    from mlkit.deploy import free_port, start_service, stop_service, wait_ready
    for attempt in range(2):  # BentoML reserves circus' two control ports and frees them before circus binds them: rarely
        port, old = free_port(), dict(os.environ)  # one is the port chosen here; that start fails, and another port is tried
        os.environ.update(env)
        try: proc = start_service(bento, port=port, settings=load_settings(ini, env={}), log=log, extra_env=extra_env)
        finally: os.environ.clear(); os.environ.update(old)
        try: wait_ready(f"http://127.0.0.1:{port}", proc, timeout=180)
        except RuntimeError:
            stop_service(proc)
            if attempt or "Address already in use" not in log.read_text(errors="replace"): raise
            continue
        break
    try: yield f"http://127.0.0.1:{port}", port
    finally: stop_service(proc)
