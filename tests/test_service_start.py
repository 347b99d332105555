"""What a served model's worker answers when it cannot start, and when a client sends what no parser or log should
take whole: a worker whose bundle fails its hash check, or has no hash recorded, answers `/readyz` and `/predict` 503
with the reason (never hangs, never restarts in a loop); JSON nested too deeply is a 400 before it is parsed; and no
error body or log line echoes more than a bounded piece of what the client sent."""
import contextlib
import http.client
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, REPO, bento_served, champion_bento, corrupt_model

pytestmark = pytest.mark.serve

ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
       "body_mass_g": 5000, "sex": "female"}
MB = 1_000_000


def _call(url: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    "(status, parsed JSON body or raw bytes) of one request."
    req = urllib.request.Request(url + path, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: status, raw = r.status, r.read()
    except urllib.error.HTTPError as e: status, raw = e.code, e.read()
    try: return status, json.loads(raw)
    except ValueError: return status, raw


@contextlib.contextmanager
def _dev_served(env: dict, tag: str, log):
    "`bentoml serve` of the penguins service folder packing BentoML model `tag` (`MLKIT_BENTO_MODEL`), up once /livez answers."
    from mlkit.deploy import free_port, stop_service
    port = free_port()
    proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "service:svc", "--host", "127.0.0.1", "--port", str(port)],
                            env={**env, "MLKIT_BENTO_MODEL": tag}, cwd=REPO / "bentos" / "penguins",
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # up once /livez answers (the arbiter holds the port before that)
            try:
                if _call(url, "/livez", timeout=2)[0] == 200: break
            except OSError: time.sleep(0.25)
        yield url, proc
    finally:
        stop_service(proc)


@pytest.fixture(scope="module")
def corrupt(trained, tmp_path_factory):
    "`bentoml serve` of the penguins service whose bundle's bytes no longer match the hash recorded at registration."
    env, tag = corrupt_model(trained, "78")
    log = tmp_path_factory.mktemp("corrupt") / "serve.log"
    with _dev_served(env, tag, log) as (url, proc): yield {"url": url, "proc": proc, "log": log}


def test_a_worker_that_cannot_start_says_why(corrupt):
    "/readyz and /predict: 503 `{error: not_started, detail}` naming the hash mismatch; /livez 200; logged once."
    url = corrupt["url"]
    status, ready = _call(url, "/readyz")
    assert status == 503 and set(ready) == {"error", "detail"} and ready["error"] == "not_started", (status, ready)
    assert "does not match the expected" in ready["detail"] and len(ready["detail"]) <= 600, ready
    assert _call(url, "/predict", json.dumps({"rows": [ROW]}).encode()) == (503, ready)
    assert _call(url, "/livez")[0] == 200
    time.sleep(3)  # a worker restarted in a loop would log again
    lines = [json.loads(ln) for ln in corrupt["log"].read_text().splitlines() if '"not_started"' in ln]
    assert len(lines) == 1 and lines[0]["level"] == "ERROR" and lines[0]["detail"] == ready["detail"], lines
    assert corrupt["proc"].poll() is None


def test_wait_ready_stops_at_once_with_the_reason(corrupt):
    "`mlkit.deploy.wait_ready` (deploy, the tests) fails at the first `not_started` 503, with its reason; the 503 is JSON a tool can read."
    from mlkit.deploy import wait_ready
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot start: .*does not match the expected"): wait_ready(corrupt["url"], corrupt["proc"], timeout=60)
    assert time.monotonic() - t0 < 10
    req = urllib.request.Request(corrupt["url"] + "/readyz")
    with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 503 and e.value.headers["content-type"] == "application/json"
    assert json.loads(e.value.read())["error"] == "not_started"


def test_a_model_with_no_recorded_hash_is_refused(trained, tmp_path):
    """The bundle hash label removed from a stored model's `model.yaml` (its bytes untouched): the check fails closed,
    never skipped: /readyz and /predict answer 503 `not_started` saying the hash is missing, nothing is scored."""
    from mlkit.config import load_settings, tool_env
    env = {**trained["env"], **tool_env(load_settings(trained["ini"], env={}))}
    code = ("import bentoml, pathlib\nfrom mlkit.registry import download_bundle\nfrom mlkit.bento import import_bundle\n"
            "p, _ = download_bundle('penguins', version='1')\ntag = import_bundle(p, 'penguins', '77')\n"
            "f = pathlib.Path(bentoml.models.get(tag).path) / 'model.yaml'\n"
            "f.write_text(''.join(ln for ln in f.read_text().splitlines(True) if not ln.startswith('  mlkit_bundle_sha256:')))\nprint(tag)\n")
    tag = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert "mlkit_bundle_sha256" not in (Path(env["BENTOML_HOME"]) / "models" / tag.replace(":", "/") / "model.yaml").read_text().split("metadata:")[0]
    with _dev_served(env, tag, tmp_path / "serve.log") as (url, _):
        status, ready = _call(url, "/readyz")
        assert (status, ready["error"]) == (503, "not_started"), (status, ready)
        assert f"BentoML model {tag}: its bundle hash is missing" in ready["detail"], ready
        assert _call(url, "/predict", json.dumps({"rows": [ROW]}).encode()) == (503, ready)


@pytest.fixture(scope="module")
def served(trained):
    "penguins@champion served with every request logged (`[serve] request_log = all`)."
    env = trained["env"]
    bento = champion_bento(env)
    log = trained["root"] / "service-start.log"
    with bento_served(bento, trained["ini"], env, log, extra_env={"MLKIT_SERVE__REQUEST_LOG": "all"}) as (url, port):
        yield {"url": url, "port": port, "log": log}


def test_deep_json_is_refused_before_it_is_parsed(served):
    "5,000 and 100,000 levels: a 400 naming the limit, at once; brackets inside a string are text, not nesting."
    for depth in (5_000, 100_000):
        body = b'{"rows": [{"island": ' + b"[" * depth + b"]" * depth + b"}]}"
        t0 = time.monotonic()
        status, out = _call(served["url"], "/predict", body)
        assert (status, out["error"]) == (400, "bad_request") and "max_json_depth" in out["detail"] and "64" in out["detail"], out
        assert time.monotonic() - t0 < 2
    status, out = _call(served["url"], "/predict", json.dumps({"rows": [{**ROW, "island": "[{" * 4_000}]}).encode())
    assert status == 200 and len(out["predictions"]) == 1, out  # an unseen category, scored


def test_parse_body_takes_many_brackets_of_small_depth():
    "A body of pixel arrays has thousands of brackets but 6 levels: parsed; a deeper one is not."
    from mlkit.guard import parse_body
    body = json.dumps({"rows": [{"image": [[[0, 0, 0]] * 32] * 32}] * 8}).encode()
    rows, bad = parse_body(body)
    assert bad is None and len(rows) == 8 and body.count(b"[") > 8_000
    assert "max_json_depth" in parse_body(body, max_depth=5)[1]


def _raw(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    "(status, body) of one request sent as is (http.client checks nothing of a long header or path)."
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items(): c.putheader(k, v)
        try: c.endheaders(body)
        except (BrokenPipeError, ConnectionResetError): pass  # it answered and closed before the body went: read its answer
        r = c.getresponse()
        return r.status, r.read()
    finally: c.close()


def test_client_text_is_echoed_bounded(served):
    "Megabytes of client text in a field name, a value, a content type or a path: a small 4xx body, a small log line."
    port, log = served["port"], served["log"]
    body = lambda **row: json.dumps({"rows": [{**ROW, **row}]}).encode()
    cases = {"field name": ("POST", "/predict", body(**{"x" * MB: 1}), {}),
             "string in a categorical field": ("POST", "/predict", body(island="B" * MB), {}),
             "unknown category of a nullable field": ("POST", "/predict", body(sex="q" * MB), {}),
             "string in a number field": ("POST", "/predict", body(bill_length_mm="1" * MB), {}),
             "not JSON": ("POST", "/predict", b'{"rows": [' + b"\x01" * MB, {}),
             "content type": ("POST", "/predict", body(), {"Content-Type": "text/" + "p" * MB}),
             "path": ("GET", "/" + "a" * MB, b"", {})}
    for what, (method, path, data, headers) in cases.items():
        before = log.stat().st_size
        status, out = _raw(port, method, path, data, headers)
        time.sleep(0.3)  # the worker's log line is written
        grown = log.stat().st_size - before
        assert 400 <= status < 500 and len(out) < 2_000, (what, status, out[:300])
        assert grown < 10_000, (what, grown, log.read_text()[-600:])
    status, out = _raw(port, "POST", "/predict", body(island="B" * 20_000))
    assert status == 422 and json.loads(out)["field"] == "island" and "at most 10000" in json.loads(out)["detail"]
