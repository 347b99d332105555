"""The open-loop generator of the serving bench (bench/openloop.py) against tiny real servers on 127.0.0.1."""
import importlib.util
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("openloop", REPO / "bench" / "openloop.py")
openloop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(openloop)

APP = '''
import asyncio
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def ok(request):
    await request.body()
    return Response(b'{"ok": true}', media_type="application/json")

async def fail(request):
    return Response(b'{"error": "no"}', status_code=503, media_type="application/json")

LOCK = asyncio.Lock()

async def slow(request):  # one request at a time, 20 ms each: the server answers at most 50 requests/s
    async with LOCK: await asyncio.sleep(0.02)
    return Response(b'{"ok": true}', media_type="application/json")

app = Starlette(routes=[Route("/ok", ok, methods=["POST", "GET"]), Route("/fail", fail, methods=["POST"]),
                        Route("/slow", slow, methods=["POST"])])
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("openloop")
    (d / "app.py").write_text(APP)
    (d / "body.json").write_text('{"rows": [{"x": 1}]}')
    from mlkit.deploy import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                             "warning", "--no-access-log"], cwd=d)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/ok", timeout=1)
            break
        except OSError: time.sleep(0.05)
    yield url, d / "body.json"
    proc.terminate(); proc.wait(10)


def test_every_scheduled_request_is_sent_and_answered(server, tmp_path):
    url, body = server
    out = tmp_path / "r.json"
    r = openloop.main(["--url", url + "/ok", "--body", str(body), "--rate", "200", "--seconds", "1", "--warm", "4", "--out", str(out)])
    assert r["sent"] == 200 and r["completed"] == 200 and r["errors"] == 0
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["connections"] >= 4 and r["client_cpu"] > 0 and r["late_max_ms"] >= r["late_p99_ms"] >= 0
    assert out.exists()


def test_non_2xx_answers_are_errors(server):
    url, body = server
    r = openloop.main(["--url", url + "/fail", "--body", str(body), "--rate", "50", "--seconds", "1", "--warm", "2"])
    assert r["sent"] == 50 and r["completed"] == 0 and r["non_2xx"] == 50 and r["errors"] == 50
    assert r["p99_ms"] is not None and r["p99_2xx_ms"] is None  # failures are in the percentiles, not left out


def test_latency_counts_from_the_schedule_when_the_server_falls_behind(server):
    """100 requests scheduled over 1 s at a server that answers at most 50 a second: the last answers come >= 2 s after the
    start, 1 s or more after they were due, whatever this machine's speed; a closed-loop client would not have sent them."""
    url, body = server
    r = openloop.main(["--url", url + "/slow", "--body", str(body), "--rate", "100", "--seconds", "1", "--warm", "8", "--drain", "30"])
    assert r["sent"] == 100 and r["completed"] == 100
    assert r["max_ms"] >= 900 and r["connections"] > 8  # the pool grew: no send waited for a busy connection
