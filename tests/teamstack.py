"""The team stack for tests: ONE PostgreSQL + S3 + MLflow (basic-auth) stack a session (scripts/team_stack.py), and test
projects that point mlkit at it with nothing but settings and MLflow's own credential variables."""
import atexit
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, project_env, write_project

_spec = importlib.util.spec_from_file_location("team_stack", REPO / "scripts" / "team_stack.py")
team_stack = importlib.util.module_from_spec(_spec)
sys.modules["team_stack"] = team_stack
_spec.loader.exec_module(team_stack)
TeamStack, BUCKET = team_stack.TeamStack, team_stack.BUCKET

_STACK: dict = {}  # the session's one stack, however many modules ask for it


def session_stack(request, tmp_path_factory) -> TeamStack:
    "The session's stack, started on first use (its start time in `.timings`) and stopped when the session ends."
    if "stack" not in _STACK:
        stack = TeamStack(tmp_path_factory.mktemp("team-stack"))
        t0 = time.monotonic()
        stack.start()
        stack.timings["fixture"] = round(time.monotonic() - t0, 2)
        _STACK["stack"] = stack
        atexit.register(stack.stop)  # a session that ends abnormally; the supervisors' PDEATHSIG covers a killed one
        request.config.add_cleanup(lambda: _STACK.pop("stack").stop())
        print(f"\nteam stack started in {stack.timings['fixture']:.1f} s ({stack.timings}) at {stack.url}", file=sys.stderr)
    return _STACK["stack"]


def stack_fixture():
    "A session-scoped `team_stack` fixture for a test module to bind (`team_stack = stack_fixture()`)."
    @pytest.fixture(scope="session")
    def team_stack(request, tmp_path_factory):
        return session_stack(request, tmp_path_factory)
    return team_stack


def team_project(root: Path, stack: TeamStack, user: str, extra: str = "") -> dict:
    """A test project in `root` whose registry is the stack's MLflow server: `[tracking] uri` in its settings.ini (no
    secret there), `user`'s credentials in its environment only. Its own state folder, as on a teammate's machine."""
    ini = write_project(root)
    ini.write_text(ini.read_text() + f"[tracking]\nuri = {stack.url}\n" + extra)
    env = project_env(ini)
    env.update({k: v for k, v in stack.env(user).items() if not k.startswith("MLKIT_")})
    return {"root": root, "ini": ini, "env": env, "state": root / "state", "user": user}


def py(code: str, env: dict, *args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    "Run Python `code` with the venv's interpreter in `env` (mlkit configured from it by the code itself)."
    r = subprocess.run([str(BIN / "python"), "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode: raise AssertionError(f"python -c exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def client_json(env: dict, expr: str):
    "Evaluate `expr` (with `c`, an MlflowClient on the project's registry) in a process of `env`; its JSON value."
    code = ("import json, mlkit.config; from mlkit.tracking import mlflow; mlkit.config.configure(); c = mlflow().MlflowClient()\n"
            f"print(json.dumps({expr}, default=str))")
    return json.loads(py(code, env).stdout.strip().splitlines()[-1])


def s3_keys(stack: TeamStack, prefix: str = "") -> list[str]:
    "The object keys in the stack's bucket under `prefix`."
    import boto3
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=team_stack.S3_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=team_stack.S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
