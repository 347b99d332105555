"""An open-loop HTTP/1.1 load generator: POSTs sent on a fixed schedule, each timed from its SCHEDULED send time.

    python bench/openloop.py --url http://127.0.0.1:3000/predict --body rows_1.json --rate 900 --seconds 5 [--out r.json]

Request i is due at start + i / rate, whatever happened to the ones before it (a closed-loop client like `wrk` waits for
an answer before it sends again, so a slow server slows its own load: coordinated omission). Sends go out on keep-alive
connections from a pool that grows whenever none is idle (a busy connection never delays a send; a new one's connect time
counts in that request's latency), on uvloop when installed. Latency = answer fully read - scheduled time, so queueing in
this client counts. It prints (or writes to --out) one JSON object: sent, completed, errors (non-2xx, broken
connections, answers still missing `--drain` seconds after the last send), p50/p99/max latency (ms) over EVERY sent request
(a failed one counted with its time to failure, one never answered with the whole run; `p99_2xx_ms`: answered ones only), the achieved rate,
how late the sends were against the schedule (late_p50/p99/max_ms, late_over_1ms / _5ms: sends that much late, the check
that the generator kept its schedule; the event loop's timers tick in milliseconds), the connections opened and this process's own CPU use (fraction of one core)
over the run. Pin it to a CPU of its own (`taskset -c 1`), as the bench does with `wrk`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit


class Conn(asyncio.Protocol):
    "One keep-alive connection with at most one request in flight; answers are parsed by Content-Length."
    def __init__(self, pool: list, done):
        self.pool, self.done, self.buf, self.transport, self.due, self.alive = pool, done, bytearray(), None, None, True

    def connection_made(self, transport): self.transport = transport

    def send(self, data: bytes, due: float):
        self.due = due
        self.transport.write(data)

    def data_received(self, data: bytes):
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0: return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"content-length:")
        if i < 0: return self._fail()  # (a chunked answer: not what these servers send)
        n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
        if len(self.buf) < end + 4 + n: return
        status = int(head[9:12])
        del self.buf[:end + 4 + n]
        due, self.due = self.due, None
        self.done(due, status)
        if b"connection: close" in head: self.alive = False; self.transport.close()
        else: self.pool.append(self)

    def _fail(self):
        if self.due is not None: self.done(self.due, 0); self.due = None
        self.alive = False
        self.transport.close()

    def connection_lost(self, exc):
        self.alive = False
        if self.due is not None: self.done(self.due, 0); self.due = None


async def run(url: str, body: bytes, rate: float, seconds: float, warm: int = 64, drain: float = 10.0,
              content_type: str = "application/json") -> dict:
    "Send `rate` requests/s for `seconds` on the schedule; the figures described in the module docstring."
    u = urlsplit(url)
    host, port, path = u.hostname, u.port or 80, u.path or "/"
    req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    lat, late, failed, errors = [], [], [], {"non_2xx": 0, "broken": 0}
    pool: list[Conn] = []
    opened = 0
    def done(due: float, status: int):
        if status == 0: errors["broken"] += 1
        elif not 200 <= status < 300: errors["non_2xx"] += 1
        else: lat.append(time.perf_counter() - due); return
        failed.append(time.perf_counter() - due)  # a failure counts in the percentiles with its time to failure
    async def connect() -> Conn:
        nonlocal opened
        opened += 1
        _, c = await loop.create_connection(lambda: Conn(pool, done), host, port)
        return c
    for c in await asyncio.gather(*(connect() for _ in range(warm))): pool.append(c)
    n = int(rate * seconds)
    connecting: set = set()
    async def send_new(due: float):  # no idle connection: open one for this request (its connect time counts)
        try: c = await connect()
        except OSError: errors["broken"] += 1; return
        late.append(time.perf_counter() - due)
        c.send(req, due)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter() + 0.01
    i = 0
    while i < n:
        now = time.perf_counter()
        while i < n and (due := t0 + i / rate) <= now:  # everything due by now goes out in this pass
            while pool and not pool[-1].alive: pool.pop()
            if pool:
                c = pool.pop()
                late.append(time.perf_counter() - due)
                c.send(req, due)
            else:
                t = loop.create_task(send_new(due)); connecting.add(t); t.add_done_callback(connecting.discard)
            i += 1
        if i < n: await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    t_last = time.perf_counter()
    while len(lat) + errors["non_2xx"] + errors["broken"] < n and time.perf_counter() - t_last < drain: await asyncio.sleep(0.005)
    t_end = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    missing = n - len(lat) - errors["non_2xx"] - errors["broken"]
    every = sorted(lat + failed + [t_end - t0] * missing)  # a request never answered counts with the whole run
    lat.sort(); late.sort()
    q = lambda xs, p: 1000 * xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
    return {"rate": rate, "seconds": seconds, "sent": n, "completed": len(lat), "errors": errors["non_2xx"] + errors["broken"] + missing,
            "non_2xx": errors["non_2xx"], "broken": errors["broken"], "missing": missing,
            "p50_ms": q(every, 0.5), "p99_ms": q(every, 0.99), "max_ms": 1000 * every[-1] if every else None,
            "p99_2xx_ms": q(lat, 0.99),
            "achieved_rps": len(lat) / (t_end - t0), "send_rps": n / (t_last - t0),
            "late_p50_ms": q(late, 0.5), "late_p99_ms": q(late, 0.99), "late_max_ms": 1000 * late[-1] if late else None,
            "late_over_1ms": sum(x > 0.001 for x in late), "late_over_5ms": sum(x > 0.005 for x in late), "connections": opened,
            "client_cpu": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (t_end - t0)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--body", required=True, help="a file holding the request body")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warm", type=int, default=64, help="connections opened before the clock starts")
    ap.add_argument("--drain", type=float, default=10.0, help="seconds to wait for answers after the last send")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError: runner = asyncio.run
    with open(a.body, "rb") as f: body = f.read()
    r = runner(run(a.url, body, a.rate, a.seconds, a.warm, a.drain))
    text = json.dumps(r)
    if a.out:
        with open(a.out, "w") as f: f.write(text)
    else: print(text)
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
