"""Limits before any other work (issue 18), on a real `bentoml serve` over real sockets: headers past
`[serve] max_header_bytes` are a 431 however they arrive (and 30 MB of them hold no memory), connections that never finish
their headers or body are answered 408 and closed after `header_timeout`/`body_timeout` while the service keeps
answering probes and predictions, and a connection past `max_connections` is a 503 at once."""
import json
import socket
import threading
import time
import urllib.request

import psutil
import pytest
from conftest import bento_served, champion_bento

pytestmark = pytest.mark.serve

ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}
LIMITS = {"MLKIT_SERVE__HEADER_TIMEOUT": "3", "MLKIT_SERVE__BODY_TIMEOUT": "3", "MLKIT_SERVE__MAX_CONNECTIONS": "260"}


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    env = trained["env"]
    bento = champion_bento(env)
    log = tmp_path_factory.mktemp("limits") / "serve.log"
    with bento_served(bento, trained["ini"], env, log, LIMITS) as (url, port):
        yield url, port, log


def worker(port: int) -> psutil.Process:
    "The one BentoML worker answering on `port` (the test project serves with one worker)."
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    found = [psutil.Process(p) for p in pids if p and "worker" in " ".join(psutil.Process(p).cmdline())]
    assert len(found) == 1, [psutil.Process(p).cmdline() for p in pids if p]
    return found[0]


def answer(sock: socket.socket, timeout: float = 15.0) -> bytes:
    "Everything the server sends until it closes the connection."
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536): out += chunk
    return out


def predict(url: str) -> int:
    req = urllib.request.Request(f"{url}/predict", json.dumps({"rows": [ROW]}).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r: return r.status


def probe(url: str, path: str = "/readyz") -> int:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as r: return r.status


def test_oversized_headers_are_a_431_and_hold_no_memory(served):
    url, port, _ = served
    with socket.create_connection(("127.0.0.1", port)) as s:  # whole, in one go
        s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n")
        head, _, body = answer(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and json.loads(body)["error"] == "headers_too_large", head
    w, before = worker(port), worker(port).memory_info().rss
    results = []

    def flood():  # 30 MB of one header, never ended: refused while it streams in
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nhost: x\r\nx-flood: ")
            sent = 0
            try:
                while sent < 30_000_000: s.sendall(b"b" * 65536); sent += 65536
            except OSError: pass  # closed by the server, as it should be
            results.append((sent, answer(s)))

    threads = [threading.Thread(target=flood) for _ in range(10)]
    for t in threads: t.start()
    for t in threads: t.join(60)
    assert len(results) == 10 and all(r.startswith(b"HTTP/1.1 431") for _, r in results), [(n, r[:40]) for n, r in results]
    assert all(n < 30_000_000 for n, _ in results)  # refused long before the end
    assert w.memory_info().rss - before < 64 * 2**20, (before, w.memory_info().rss)
    assert probe(url) == 200 and predict(url) == 200


def test_slow_clients_are_closed_and_never_crowd_out_real_ones(served):
    url, port, _ = served
    w = worker(port)
    fds = w.num_fds()
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    for s in slow: s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\n")  # a head that never ends
    t0 = time.monotonic()
    for _ in range(2):  # one more byte a second: a trickle never resets the deadline
        time.sleep(1)
        for s in slow: s.sendall(b"x")
        assert probe(url) == 200 and probe(url, "/livez") == 200 and predict(url) == 200  # while all 200 are held
    assert w.num_fds() >= fds + 200  # (they are really held)
    answers = [answer(s) for s in slow]
    waited = time.monotonic() - t0
    assert all(a.startswith(b"HTTP/1.1 408") and b"headers did not arrive within 3 s" in a for a in answers), {a[:60] for a in answers}
    assert 3 <= waited < 12, waited
    for s in slow: s.close()
    deadline = time.monotonic() + 10
    while w.num_fds() > fds + 5 and time.monotonic() < deadline: time.sleep(0.2)
    assert w.num_fds() <= fds + 5, (fds, w.num_fds())
    # bare CRLFs between requests begin no request, but start the clock all the same (they used to keep a connection forever)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in idle: s.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
    for s in idle: s.settimeout(10); assert s.recv(65536).startswith(b"HTTP/1.1 200")
    for _ in range(2):  # (within the 3 s: a write after the server's close would fail)
        for s in idle: s.sendall(b"\r\n")
        time.sleep(1)
    late = [answer(s) for s in idle]
    assert all(b"HTTP/1.1 408" in a and b"headers did not arrive within 3 s" in a for a in late), {a[:80] for a in late}
    for s in idle: s.close()
    # a body that stops short of its content-length
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{\"rows\": [")
        a = answer(s)
    assert a.startswith(b"HTTP/1.1 408") and b"body did not arrive within 3 s" in a, a[:200]
    assert predict(url) == 200


def test_connections_past_the_limit_are_refused_at_once(served):
    url, port, _ = served
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(260)]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port)) as s:
            head, _, body = answer(s, timeout=5).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"] == "overloaded", head
    finally:
        for s in held: s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if probe(url) == 200: break
        except OSError: time.sleep(0.2)
    assert probe(url) == 200 and predict(url) == 200
