"""Operating a served model: OpenTelemetry traces, JSON request and access logs, SIGTERM drain, a corrupt bundle."""
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
from conftest import BIN, REPO, corrupt_model, mlkit

pytestmark = pytest.mark.serve

ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
       "body_mass_g": 5000, "sex": "female"}


class Collector(http.server.ThreadingHTTPServer):
    "A stand-in OpenTelemetry collector: keeps the body of every OTLP/HTTP export it receives."
    def __init__(self):
        self.bodies = []
        outer = self
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200); self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0"); self.end_headers()
            def log_message(self, *a): pass
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _start(target: str, env: dict, log, port: int, cwd=REPO) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=cwd,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def ops(trained):
    from mlkit.config import tool_env
    from mlkit.deploy import free_port, stop_service, wait_ready
    bento = mlkit("build", "penguins", "--version", "1", env=trained["env"], check=True).stdout.strip().splitlines()[-1]
    collector = Collector()
    from mlkit.config import load_settings
    env = {**trained["env"], **tool_env(load_settings(trained["ini"], env={})),
           "MLKIT_SERVE__TRACING_EXPORTER": "otlp", "MLKIT_SERVE__TRACING_ENDPOINT": f"http://127.0.0.1:{collector.server_port}/v1/traces",
           "MLKIT_SERVE__REQUEST_LOG": "all", "MLKIT_SERVE__ACCESS_LOG": "true"}
    port, log = free_port(), trained["root"] / "ops-serve.log"
    proc = _start(bento, env, log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        yield {"url": url, "port": port, "proc": proc, "log": log, "collector": collector, "trained": trained}
    finally:
        stop_service(proc)
        collector.shutdown()


def _post(url, rows, rid, headers=None):
    req = urllib.request.Request(url + "/predict", json.dumps({"rows": rows}).encode(),
                                 {"Content-Type": "application/json", "x-request-id": rid, **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())


def _wait(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = check()
        if out: return out
        time.sleep(0.25)
    return check()


def test_traces_reach_the_otlp_collector(ops):
    "The request's span is exported, in the caller's trace when it sends a W3C `traceparent`."
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert _post(ops["url"], [ROW], "trace-check-1", {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})[0] == 200
    got = _wait(lambda: [b for path, b in ops["collector"].bodies if path == "/v1/traces" and bytes.fromhex(trace_id) in b], 30)
    assert got, f"no span of the caller's trace exported (exports seen: {len(ops['collector'].bodies)})"
    assert b"/predict" in got[0] and b"penguins" in got[0]  # the route's span; the service name is in the resource


def test_request_log_all_and_access_log(ops):
    rid = "ops-log-check-7"
    assert _post(ops["url"], [ROW, ROW], rid)[0] == 200
    def lines():
        text = ops["log"].read_text()
        return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{") and rid in ln], text
    found = _wait(lambda: lines()[0], 10)
    assert found and found[0]["status"] == 200 and found[0]["rows"] == 2 and found[0]["answered_by"] == "champion"
    assert found[0]["level"] == "INFO" and found[0]["ms"] > 0
    text = lines()[1]
    assert any("/predict" in ln and "200" in ln and not ln.startswith("{") for ln in text.splitlines()), "no access log line"


def test_sigterm_drains_in_flight_requests(ops):
    "Requests the server has started (headers read, body still arriving) finish with 200 after SIGTERM, and are logged."
    from mlkit.predlog import read_prediction_log
    body = json.dumps({"rows": [ROW] * 50}).encode()
    conns = []
    for i in range(4):
        c = http.client.HTTPConnection("127.0.0.1", ops["port"], timeout=30)
        c.putrequest("POST", "/predict")
        for k, v in {"Content-Type": "application/json", "x-request-id": f"drain-{i}", "Content-Length": str(len(body))}.items():
            c.putheader(k, v)
        c.endheaders()
        c.send(body[:10])
        conns.append(c)
    time.sleep(0.5)
    os.killpg(ops["proc"].pid, signal.SIGTERM)
    time.sleep(1.0)  # the server is shutting down while these requests are half-sent
    for c in conns: c.send(body[10:])
    answers = [c.getresponse() for c in conns]
    assert [a.status for a in answers] == [200] * 4
    assert all(len(json.loads(a.read())["predictions"]) == 50 for a in answers)
    assert ops["proc"].wait(60) is not None
    folder = ops["trained"]["state"] / "predictions" / "penguins"
    logged = read_prediction_log(folder)
    assert all((logged["request_id"] == f"drain-{i}").sum() == 50 for i in range(4))  # flushed at shutdown


def test_corrupt_bundle_never_serves(trained, tmp_path):
    """A bundle whose bytes no longer match the SHA-256 recorded at registration: the worker stays up without a model, and
    /readyz and /predict answer 503 `not_started` with the reason (never 200, never a hang); nothing is served."""
    from mlkit.deploy import free_port, stop_service
    env, tag = corrupt_model(trained, "77")
    port, log = free_port(), tmp_path / "corrupt.log"
    proc = _start("service:svc", {**env, "MLKIT_BENTO_MODEL": tag}, log, port, cwd=REPO / "bentos" / "penguins")
    seen = []
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            for path in ("/readyz", "/predict"):
                try:
                    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps({"rows": [ROW]}).encode() if path == "/predict" else None,
                                                 {"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=2) as r: seen.append((path, r.status, None))
                except urllib.error.HTTPError as e: seen.append((path, e.code, json.loads(e.read())))
                except OSError: seen.append((path, "no answer", None))
            time.sleep(0.5)
    finally:
        stop_service(proc)
    assert seen and not [s for s in seen if s[1] == 200], seen
    answered = [s for s in seen if s[1] != "no answer"]
    assert answered and answered[-1][1] == 503 and seen.index(answered[0]) + len(answered) == len(seen), seen  # once up, it answers
    assert {(s[0], s[1], s[2]["error"]) for s in answered} == {("/readyz", 503, "not_started"), ("/predict", 503, "not_started")}, answered
    assert all("does not match the expected" in s[2]["detail"] for s in answered), answered
    assert "does not match the expected" in log.read_text()


def test_prediction_log_parts_survive_kill_9(trained, tmp_path):
    "After `kill -9` mid-traffic every finished prediction-log part is readable and no half-written file is picked up."
    from mlkit.config import load_settings, tool_env
    from mlkit.deploy import _alive, _descendants, free_port, wait_ready
    from mlkit.predlog import read_prediction_log
    bento = mlkit("build", "penguins", "--version", "1", env=trained["env"], check=True).stdout.strip().splitlines()[-1]
    env = {**trained["env"], **tool_env(load_settings(trained["ini"], env={}))}
    port = free_port()
    proc = _start(bento, env, tmp_path / "serve.log", port)
    url = f"http://127.0.0.1:{port}"
    folder = trained["state"] / "predictions" / "penguins"
    try:
        wait_ready(url, proc, timeout=180)
        for i in range(20): assert _post(url, [ROW] * 50, f"kill9-before-{i}")[0] == 200
        ours = lambda: (df := read_prediction_log(folder)).height and (df["request_id"] == "kill9-before-19").sum() == 50
        assert _wait(ours, 15), "the rows were not written within the flush interval"
        stop, sent = threading.Event(), []
        def traffic():
            while not stop.is_set():
                try: sent.append(_post(url, [ROW] * 50, f"kill9-during-{len(sent)}")[0])
                except OSError: return
        t = threading.Thread(target=traffic)
        t.start()
        time.sleep(2.5)  # some parts written while requests keep coming
    finally:
        workers = _descendants(proc.pid)  # circus starts each worker in a session of its own: killpg misses them
        for pid in [proc.pid, *workers]: os.kill(pid, signal.SIGKILL)
        proc.wait(30)
    stop.set(); t.join()
    alive = lambda: [pid for pid in workers if _alive(pid)]
    assert workers and _wait(lambda: not alive(), 10), f"the worker that writes the log was not killed: {alive()}"
    parts = sorted(folder.glob("part-*.parquet"))
    assert parts and sent
    import polars as pl
    for p in parts: pl.read_parquet(p)  # every finished part is readable
    logged = read_prediction_log(folder).filter(pl.col("request_id").str.starts_with("kill9-"))
    assert all((logged["request_id"] == f"kill9-before-{i}").sum() == 50 for i in range(20))
    assert set(logged.group_by("request_id").len()["len"].to_list()) == {50}  # a request's rows are never split by a crash
