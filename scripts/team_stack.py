"""A team's MLflow stack on one machine, with real parts: PostgreSQL, an S3 endpoint (moto's server) and `mlflow server`
with MLflow's basic-auth app, all on 127.0.0.1 in a folder of their own.

    python scripts/team_stack.py [--dir DIR] [--port PORT]   # foreground (`make team`): prints the `export` lines; Ctrl-C stops all

From Python (the team suite, tests/teamstack.py):

    with TeamStack(folder) as stack:
        env = stack.env("alice")   # MLKIT_TRACKING__URI, MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_S3_ENDPOINT_URL, AWS_*
        stack.permission("carol", "penguins")   # READ: carol is not in the `team` role (alice, bob, dave: EDIT)

Every service runs under a supervisor in a process group of its own that kills the group when the process that started
it dies (PR_SET_PDEATHSIG, SIGKILL included), so nothing outlives a test that ends, fails or is killed. PostgreSQL
refuses to run as root: its data folder belongs to `postgres` and it runs as that user. Passwords are made at start
and handed out only through the environment (`env`) and the stack folder's auth config (mode 600), never in a log.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name), reverse=True)
BUCKET = "mlkit-team"
# Who is in the `team` role (EDIT on every experiment and registered model); the others get the default, READ.
USERS = {"alice": True, "bob": True, "dave": True, "carol": False}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "mlkit-test", "AWS_SECRET_ACCESS_KEY": "mlkit-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}

# Runs argv[3:] (as user argv[2] when given) in this process group and kills the group (SIGKILL) when the process
# argv[1] dies, however it dies: Linux sends this supervisor SIGTERM then (PR_SET_PDEATHSIG = 1). SIGINT/SIGTERM sent
# to the group by `stop` reach the service itself first (postgres: fast shutdown).
_SUPERVISOR = """\
import ctypes, os, signal, subprocess, sys
def stop(*_): os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *_: None)
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1))
signal.signal(signal.SIGUSR1, stop)
if os.getppid() != int(sys.argv[1]): stop()
user = sys.argv[2] or None
p = subprocess.Popen(sys.argv[3:], user=user, group=user, extra_groups=[] if user else None,
                     preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), signal.signal(signal.SIGTERM, signal.SIG_DFL)))
rc = p.wait()
sys.exit(rc if rc >= 0 else 128 - rc)
"""


PG_PREFIX = "mlkit-team-pg-"  # + the pid of the process whose stack it is


def _remove_stale_pg_folders():
    "Remove PostgreSQL folders left in /tmp by stacks whose process was killed (stop removes its own)."
    for d in Path(tempfile.gettempdir()).glob(f"{PG_PREFIX}*"):
        pid = d.name[len(PG_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists(): shutil.rmtree(d, ignore_errors=True)


class StackError(RuntimeError):
    "A part of the team stack did not start: the message names it and ends with its log's tail."


def free_port() -> int:
    "A TCP port free on 127.0.0.1 right now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try: return path.read_text(errors="replace")[-n:]
    except OSError: return ""


class TeamStack:
    "PostgreSQL + moto's S3 + `mlflow server --app-name basic-auth` on 127.0.0.1 in `root`; a context manager."

    def __init__(self, root: Path | str | None = None, port: int | None = None, users: dict | None = None):
        self.temp = root is None  # a folder of its own, removed by `stop`
        self.root = Path(root or tempfile.mkdtemp(prefix="mlkit-team-")).resolve()
        self.pg_port, self.s3_port, self.port = free_port(), free_port(), port or free_port()
        self.team = {u: in_team for u, in_team in (users or USERS).items()}
        self.users = {u: secrets.token_urlsafe(12) for u in self.team}
        self.default_permission = "READ"  # MLflow's default: a user outside the team role only reads
        self.admin = ("admin", secrets.token_urlsafe(16))
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.pg_dir: Path | None = None

    # --- addresses and environments ------------------------------------------------------------------------------
    @property
    def url(self) -> str: return f"http://127.0.0.1:{self.port}"
    @property
    def s3_url(self) -> str: return f"http://127.0.0.1:{self.s3_port}"
    def db_uri(self, db: str = "mlflow") -> str: return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/{db}"

    def env(self, user: str = "alice") -> dict[str, str]:
        "The environment of a client working as `user`: mlkit's tracking setting, MLflow's credentials, the S3 endpoint."
        password = self.admin[1] if user == self.admin[0] else self.users[user]
        return {"MLKIT_TRACKING__URI": self.url, "MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password, "MLFLOW_S3_ENDPOINT_URL": self.s3_url, **S3_KEYS}

    def exports(self, user: str = "alice") -> str:
        "The `export` lines a user pastes into a shell to work as `user`."
        return "\n".join(f"export {k}={v}" for k, v in self.env(user).items() if k != "AWS_DEFAULT_REGION")

    # --- processes ----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict | None = None, user: str = "") -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, str(os.getpid()), user, *map(str, cmd)], env=env,
                             cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def _wait(self, name: str, ready, timeout: float = 120.0):
        "Wait until `ready()` returns without raising; raises `StackError` with the log's tail if `name` exits or time runs out."
        t0, p = time.monotonic(), self.procs[name]
        while time.monotonic() - t0 < timeout:
            if p.poll() is not None:
                raise StackError(f"{name} exited with code {p.returncode} before it was ready:\n{_tail(self.root / f'{name}.log')}")
            try:
                ready()
                return
            except Exception: pass  # not up yet
            time.sleep(0.1)
        raise StackError(f"{name} was not ready after {timeout:.0f} s:\n{_tail(self.root / f'{name}.log')}")

    def _timed(self, what: str, f):
        t0 = time.monotonic()
        f()
        self.timings[what] = round(time.monotonic() - t0, 2)

    # --- PostgreSQL ---------------------------------------------------------------------------------------------
    def _postgres(self):
        "initdb and start PostgreSQL as `postgres` (it refuses root); `_postgres_ready` waits for it and makes the databases."
        if not PG_BINS: raise StackError("PostgreSQL's server is missing (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
        bin_, pg = PG_BINS[0].parent, pwd.getpwnam("postgres")
        # postgres cannot traverse a root-only folder (pytest's tmp is 0700): its data lives in /tmp, named after this pid
        _remove_stale_pg_folders()
        self.pg_dir = Path(tempfile.mkdtemp(prefix=f"{PG_PREFIX}{os.getpid()}-"))
        (self.root / "pg").symlink_to(self.pg_dir)
        data, sock = self.pg_dir / "data", self.pg_dir / "socket"
        os.chown(self.pg_dir, pg.pw_uid, pg.pw_gid)
        for d in (data, sock):
            d.mkdir(mode=0o700)
            os.chown(d, pg.pw_uid, pg.pw_gid)
        r = subprocess.run(["runuser", "-u", "postgres", "--", bin_ / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"], capture_output=True, text=True)
        if r.returncode: raise StackError(f"initdb failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")
        self._spawn("postgres", [bin_ / "postgres", "-D", data, "-p", self.pg_port, "-k", sock, "-c", "listen_addresses=127.0.0.1",
                                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"], user="postgres")

    def _postgres_ready(self):
        import psycopg2
        dsn = self.db_uri("postgres").replace("+psycopg2", "")
        self._wait("postgres", lambda: psycopg2.connect(dsn, connect_timeout=2).close(), timeout=60)
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as c:
            for db in ("mlflow", "mlflow_auth"): c.execute(f"CREATE DATABASE {db}")
        conn.close()

    # --- S3 -----------------------------------------------------------------------------------------------------
    def _s3(self):
        "Start moto's S3 server; `_s3_ready` waits for it and makes the bucket."
        self._spawn("s3", [Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", self.s3_port],
                    env={**os.environ, **S3_KEYS})

    def _s3_ready(self):
        self._wait("s3", lambda: urllib.request.urlopen(self.s3_url + "/moto-api/", timeout=2).close(), timeout=60)
        import boto3
        boto3.client("s3", endpoint_url=self.s3_url, **{k.lower(): v for k, v in S3_KEYS.items() if k != "AWS_DEFAULT_REGION"},
                     region_name=S3_KEYS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)

    # --- MLflow -------------------------------------------------------------------------------------------------
    def _mlflow(self):
        auth = self.root / "auth.ini"
        auth.write_text(f"[mlflow]\ndefault_permission = {self.default_permission}\ndatabase_uri = {self.db_uri('mlflow_auth')}\n"
                        f"admin_username = {self.admin[0]}\nadmin_password = {self.admin[1]}\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                        "auth_cache_ttl_seconds = 60\n")  # a password hash costs ~0.1-1 s of CPU: once a minute per user, not per request
        auth.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLKIT_", "AWS_"))}
        env.update(S3_KEYS, MLFLOW_S3_ENDPOINT_URL=self.s3_url, MLFLOW_AUTH_CONFIG_PATH=str(auth),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16), MLFLOW_DISABLE_TELEMETRY="true")
        self._spawn("mlflow", [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", self.db_uri(),
                               "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--serve-artifacts",
                               "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", self.port, "--workers", "1"], env=env)
        self._wait("mlflow", lambda: urllib.request.urlopen(self.url + "/health", timeout=2).close(), timeout=180)

    def api(self, path: str, body: dict | None = None, user: str | None = None, method: str | None = None) -> dict:
        "Call the server's REST API as `user` (default the admin); returns the JSON answer, raises `urllib.error.HTTPError`."
        user = user or self.admin[0]
        password = self.admin[1] if user == self.admin[0] else self.users[user]
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     method=method or ("GET" if body is None else "POST"),
                                     headers={"Content-Type": "application/json", "Authorization":
                                              "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
        return json.loads(text) if text.strip() else {}

    def grant(self, user: str, model: str, permission: str, resource_type: str = "registered_model"):
        "Give `user` `permission` (READ, EDIT, MANAGE, NO_PERMISSIONS) on the registered model (or `resource_type`) `model`."
        self.api("/api/3.0/mlflow/users/permissions/grant",
                 {"username": user, "resource_type": resource_type, "resource_id": model, "permission": permission})

    def permission(self, user: str, model: str, resource_type: str = "registered_model") -> str:
        "`user`'s effective permission on `model`, as the server resolves it for a real request."
        q = urllib.parse.urlencode({"username": user, "resource_type": resource_type, "resource_id": model})
        return self.api(f"/api/3.0/mlflow/users/permissions/get?{q}")["permission"]

    def _users(self):
        "The users (side by side: hashing a password costs the server CPU) and the `team` role, EDIT on everything."
        with ThreadPoolExecutor(len(self.users)) as pool:
            list(pool.map(lambda u: self.api("/api/2.0/mlflow/users/create", {"username": u, "password": self.users[u]}), self.users))
        role = self.api("/api/3.0/mlflow/roles/create", {"workspace": "default", "name": "team"})["role"]["id"]
        for kind in ("experiment", "registered_model"):
            self.api("/api/3.0/mlflow/roles/permissions/add",
                     {"role_id": role, "resource_type": kind, "resource_pattern": "*", "permission": "EDIT"})
        for user in (u for u, in_team in self.team.items() if in_team):
            self.api("/api/3.0/mlflow/roles/assign", {"username": user, "role_id": role})

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> TeamStack:
        "Start PostgreSQL and S3 side by side, then MLflow on them, then make the users; stops what started on failure."
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            # Processes start from this thread: PR_SET_PDEATHSIG fires when the *thread* that started a child ends.
            self._s3()
            self._timed("initdb", self._postgres)
            with ThreadPoolExecutor(2) as pool:
                for f in [pool.submit(self._timed, "postgres", self._postgres_ready), pool.submit(self._timed, "s3", self._s3_ready)]: f.result()
            self._timed("mlflow", self._mlflow)
            self._timed("users", self._users)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - t0, 2)
        return self

    def stop(self, timeout: float = 20.0):
        "Stop MLflow, S3, then PostgreSQL (fast shutdown); a group that does not go in `timeout` seconds is killed."
        for name in ("mlflow", "s3", "postgres"):
            p = self.procs.pop(name, None)
            if p is None: continue
            try: os.killpg(p.pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
            except ProcessLookupError: pass
            try: p.wait(timeout)
            except subprocess.TimeoutExpired: pass
            try: os.killpg(p.pid, signal.SIGKILL)  # whatever is left of the group (a worker that lingers)
            except ProcessLookupError: pass
            p.wait()
        if self.pg_dir: shutil.rmtree(self.pg_dir, ignore_errors=True)
        if self.temp: shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> TeamStack: return self.start()
    def __exit__(self, *exc): self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Start a team stack (PostgreSQL, S3, MLflow with basic-auth) on 127.0.0.1 until Ctrl-C.")
    ap.add_argument("--dir", type=Path, help="the stack's folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--port", type=int, help="the MLflow server's port (default: a free one)")
    ap.add_argument("--user", default="alice", choices=list(USERS), help="whose credentials the export lines carry")
    args = ap.parse_args(argv)
    stack = TeamStack(args.dir, port=args.port)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start()
        print(f"# team stack in {stack.root}: MLflow {stack.url} (PostgreSQL :{stack.pg_port}, S3 {stack.s3_url}, "
              f"bucket {BUCKET}); started in {stack.timings['total']:.1f} s. Users: {', '.join(stack.users)} "
              "(carol only reads; pick one with --user). Paste into a shell, then run mlkit:", flush=True)
        print(stack.exports(args.user), flush=True)
        others = [u for u in stack.users if u != args.user]  # a teammate's shell: the same lines with their user and password
        print("# the other users (for a teammate's shell): " + ", ".join(f"{u} / {stack.users[u]}" for u in others), flush=True)
        print("# Ctrl-C stops the stack", file=sys.stderr, flush=True)
        while all(p.poll() is None for p in stack.procs.values()): time.sleep(0.5)
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        print(f"team stack: {', '.join(dead)} exited; see {stack.root}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except StackError as e:
        print(f"team stack: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
