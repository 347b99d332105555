"""Processes that must not outlive mlkit, and deployments that act only on their own process (issue 18): real `mlkit
serve`, `mlkit ui` and `mlkit deploy` processes, real signals and sockets, the process tree seen through psutil."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import MLKIT, mlkit

pytestmark = pytest.mark.serve

FIXTURES = Path(__file__).parent / "fixtures"
STOP_BOUND = 45  # s: a stopped server and all it started are gone well within mlkit's 20 s grace + 10 s for leftovers


@pytest.fixture(scope="module")
def project(trained):
    "The trained test project with a champion and its Bento."
    env = trained["env"]
    mlkit("models", "promote", "penguins", env=env, check=True)
    bento = mlkit("build", "penguins", env=env, check=True).stdout.strip().splitlines()[-1]
    return {**trained, "bento": bento}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, log: Path) -> subprocess.Popen:
    "The real `mlkit ARGS`, its output in `log`."
    return subprocess.Popen([MLKIT, *map(str, args)], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode} before {url} answered:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def listeners(port: int) -> set[int]:
    "PIDs with a socket listening on `port`."
    return {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}


def alive(procs) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE: out.append(p)
        except psutil.Error: pass
    return out


def tree_of(pid: int, at_least: int, timeout: float = 30) -> list:
    "The processes below `pid` once there are `at_least` of them (a server's workers start after its arbiter)."
    deadline = time.monotonic() + timeout
    while len(kids := psutil.Process(pid).children(recursive=True)) < at_least and time.monotonic() < deadline: time.sleep(0.2)
    return kids


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
        try: s.bind(("127.0.0.1", port))
        except OSError: return False
        return True


def kill_all(procs):
    for p in alive(procs):
        try: p.kill()
        except psutil.Error: pass


def stop_and_check(proc: subprocess.Popen, tree: list, port: int, sig: int) -> tuple[int, float]:
    "Send `sig` to the mlkit process only; returns its exit code and how long it took, after checking nothing is left."
    t0 = time.monotonic()
    proc.send_signal(sig)
    try: rc = proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired: rc = None
    took = time.monotonic() - t0
    left = alive(tree)
    kill_all(tree)
    if rc is None: proc.kill(); proc.wait()
    assert rc is not None, f"mlkit still ran {STOP_BOUND} s after {signal.Signals(sig).name}"
    assert not left, [(p.pid, p.cmdline()[:4]) for p in left]
    assert not listeners(port) and bindable(port)
    return rc, took


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_with_all_its_workers(project, sig, tmp_path):
    "A signal to `mlkit serve` alone stops bentoml's arbiter and its workers (each in a session of its own) and frees the port."
    port, log = free_port(), tmp_path / "serve.log"
    proc = start(["serve", "penguins", "--port", port], project["env"], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        tree = tree_of(proc.pid, 2)
    except BaseException:
        kill_all(psutil.Process(proc.pid).children(recursive=True)); proc.kill(); raise
    assert listeners(port) & {p.pid for p in tree}
    assert [p for p in tree[1:] if os.getsid(p.pid) == p.pid], "a worker in a session of its own (out of the group's reach)"
    rc, took = stop_and_check(proc, tree, port, sig)
    assert rc == 0 and took < 30, (rc, took)
    assert "stopping" in log.read_text() and "Service instance cleanup finalized" in log.read_text()  # drained, not killed


def test_serve_exits_with_the_code_of_a_crashed_service(project, tmp_path):
    "When the service dies by itself, `mlkit serve` exits with its code and stops the workers it left behind."
    port, log = free_port(), tmp_path / "serve.log"
    proc, tree, rc = start(["serve", "penguins", "--port", port], project["env"], log), [], None
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        tree = tree_of(proc.pid, 2)
        psutil.Process(proc.pid).children()[0].kill()  # the arbiter: its workers would serve on as orphans
        rc = proc.wait(STOP_BOUND)
    finally:
        left = alive(tree)
        kill_all(tree)
        if proc.poll() is None: proc.kill(); proc.wait()
    assert rc == 128 + signal.SIGKILL
    assert not left, [(p.pid, p.cmdline()[:4]) for p in left]
    assert not listeners(port) and bindable(port)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ui_stops_the_mlflow_server_and_its_workers(project, sig, tmp_path):
    "A signal to `mlkit ui` alone stops the MLflow server, uvicorn, its job runner and consumers, and frees the port."
    port, log = free_port(), tmp_path / "ui.log"
    proc = start(["ui", "--port", port], project["env"], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        tree = tree_of(proc.pid, 2)
    except BaseException:
        kill_all(psutil.Process(proc.pid).children(recursive=True)); proc.kill(); raise
    rc, took = stop_and_check(proc, tree, port, sig)
    assert took < 30, took


STUBBORN = """
import signal, subprocess, sys, time
from mlkit.core import run_foreground
child = ("import signal, subprocess, sys, time\\n"
         "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\\n"
         "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "time.sleep(300)'], start_new_session=True)\\n"
         "print('ready', flush=True); time.sleep(300)\\n")
sys.exit(run_foreground(lambda: subprocess.Popen([sys.executable, "-c", child], start_new_session=True), grace=float(sys.argv[1])))
"""


ORPHANING = """
import subprocess, sys
from mlkit.core import run_foreground
child = ("import signal, subprocess, sys, time\\n"
         "def stop(*_):\\n"  # as an arbiter forking a worker while it stops: the new process is in no tree seen before
         "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); sys.exit(0)\\n"
         "signal.signal(signal.SIGTERM, stop)\\n"
         "print('ready', flush=True); time.sleep(300)\\n")
sys.exit(run_foreground(lambda: subprocess.Popen([sys.executable, "-c", child], start_new_session=True), grace=5))
"""


def test_a_process_started_while_stopping_is_found_and_stopped():
    "A process the child starts as it stops (orphaned at once, never in the tree seen) is found by its environment's token."
    from mlkit.core import RUN_MARK_ENV
    proc = subprocess.Popen([sys.executable, "-c", ORPHANING], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None: proc.kill()
    time.sleep(0.5)
    marked = []
    for p in psutil.process_iter():
        try:
            if RUN_MARK_ENV in p.environ() and "time.sleep(300)" in " ".join(p.cmdline()): marked.append(p)
        except psutil.Error: continue
    kill_all(marked)
    assert not marked, [p.cmdline() for p in marked]


@pytest.mark.parametrize("second", [False, True], ids=["grace", "second-signal"])
def test_a_child_that_ignores_signals_is_killed(second):
    "A child ignoring SIGINT and SIGTERM is killed after the grace, or at once on a second signal, its own orphan too."
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, "60" if second else "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        tree = tree_of(proc.pid, 2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if second:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None: proc.kill()
    left = alive(tree)
    kill_all(tree)
    assert rc == 128 + signal.SIGKILL and not left, (rc, left)
    assert (took < 3) if second else (2.5 < took < 10), took


@pytest.mark.parametrize("command", [["serve", "penguins"], ["ui"], ["deploy", "penguins"]], ids=["serve", "ui", "deploy"])
def test_a_port_in_use_is_one_line_and_exit_2(project, command):
    "A port another process holds: one line on stderr naming host:port, exit 2, no traceback and nothing started."
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0)); held.listen()
        port = held.getsockname()[1]
        r = mlkit(*command, "--port", port, env=project["env"], timeout=300)
        assert listeners(port) == {os.getpid()}
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"mlkit {command[0]}: ") and f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr, r.stderr


def record_file(project) -> Path: return project["state"] / "deployments" / "penguins.json"


def services_on(port: int) -> list:
    "The `bentoml serve` processes mlkit started for `port`."
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("bentoml_serve" in a for a in cmd) and str(port) in cmd: out.append(p)
    return out


def test_two_concurrent_deploys_leave_one_service(project):
    "Two `mlkit deploy` at once: one starts the service, the other waits for it and finds it serving; `--stop` leaves none."
    env, port = project["env"], free_port()
    try:
        ps = [subprocess.Popen([MLKIT, "deploy", "penguins", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [(p.wait(400), *p.communicate()) for p in ps]
        assert [o[0] for o in outs] == [0, 0], outs
        said = sorted("already serves" in o[1] for o in outs)
        assert said == [False, True], outs  # one started it, the other found it
        rec = json.loads(record_file(project).read_text())
        assert rec["format"] == 2 and rec["pid_started"] == psutil.Process(rec["pid"]).create_time()
        services = services_on(port)
        assert [p.pid for p in services] == [rec["pid"]], services
        own = {rec["pid"], *(c.pid for c in psutil.Process(rec["pid"]).children(recursive=True))}
        assert listeners(port) and listeners(port) <= own
        for _ in range(5):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                assert r.headers["x-mlkit-instance"] == rec["instance"]
        tree = [psutil.Process(p) for p in own]
    finally:
        r = mlkit("deploy", "penguins", "--stop", env=env)
    assert r.returncode == 0 and "stopped penguins version" in r.stdout, (r.stdout, r.stderr)
    assert not alive(tree) and not services_on(port) and not listeners(port) and bindable(port)
    assert not record_file(project).exists()


def test_the_deployment_lock_names_its_holder_and_dies_with_it(project):
    "A deploy that cannot get the lock in time fails naming the holder; a holder that dies releases it at once."
    from mlkit.config import load_settings
    from mlkit.core import Unavailable
    from mlkit.deploy import deployment_lock
    code = ("import sys, time\nfrom mlkit.config import load_settings\nfrom mlkit.deploy import deployment_lock\n"
            "with deployment_lock('penguins', load_settings(sys.argv[1], env={})):\n    print('held', flush=True); time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(project["ini"])], stdout=subprocess.PIPE, text=True)
    s = load_settings(project["ini"], env={})
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=f"another deploy holds .*pid {holder.pid}: .*gave up after 1 s"):
            with deployment_lock("penguins", s, wait=1): pass
        assert 0.9 < time.monotonic() - t0 < 5
        holder.kill(); holder.wait()
        with deployment_lock("penguins", s, wait=1): pass  # the kernel released it with its holder
    finally:
        if holder.poll() is None: holder.kill(); holder.wait()


def test_a_recorded_pid_that_is_not_the_service_is_left_alone(project):
    """A deployment record whose PID is now an unrelated process (its start time differs, or an old record's command
    line is not the service's): `deploy --stop` and `deploy` never signal it, say so, and take the deployment as not running."""
    env, port = project["env"], free_port()
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    me = psutil.Process(sleeper.pid)
    v1 = {**json.loads((FIXTURES / "deployment-v1.json").read_text()), "pid": sleeper.pid, "bento": project["bento"], "port": port}
    v2 = {**v1, "format": 2, "pid_started": me.create_time() - 60, "cmdline": me.cmdline()}
    try:
        for rec in (v1, v2):
            record_file(project).parent.mkdir(parents=True, exist_ok=True)
            record_file(project).write_text(json.dumps(rec))
            r = mlkit("deploy", "penguins", "--stop", env=env)
            assert r.returncode == 0 and r.stdout.strip() == "penguins: no local deployment is running", (r.stdout, r.stderr)
            assert f"pid {sleeper.pid} in its deployment record is not the service deploy started" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1 and sleeper.poll() is None
        r = mlkit("deploy", "penguins", "--port", port, env=env)  # v2 still recorded: deployed anew, the sleeper untouched
        assert r.returncode == 0 and "serves on" in r.stdout and "not the service deploy started" in r.stderr, (r.stdout, r.stderr)
        assert sleeper.poll() is None
        rec = json.loads(record_file(project).read_text())
        tree = [psutil.Process(rec["pid"]), *psutil.Process(rec["pid"]).children(recursive=True)]
        old = {k: v for k, v in rec.items() if k in v1}  # as an earlier mlkit would have written it: no format, no start time
        record_file(project).write_text(json.dumps(old))
        r = mlkit("deploy", "penguins", "--stop", env=env)  # an old record of mlkit's own service still stops it
        assert r.returncode == 0 and "stopped penguins version" in r.stdout, (r.stdout, r.stderr)
        assert not alive(tree) and not listeners(port) and sleeper.poll() is None
    finally:
        mlkit("deploy", "penguins", "--stop", env=env)
        sleeper.kill(); sleeper.wait()
