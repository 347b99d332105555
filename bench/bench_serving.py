"""Serving under load: mlkit's Bento (batched and unbatched) against its peers, all in one run, in interleaved rounds.

One registered penguins version (trained here with the CI parameters) is served by every peer below, one at a time,
each pinned to CPU 0 while the client (`wrk`, one thread; or `bench/openloop.py`) runs pinned to CPU 1; a registered
diabetes version (the regression, trained here with its CI parameters) is served by its own Bento, batched and
unbatched, in the same rounds, so its figures have the same baselines measured in the same run:
  - mlkit batched: `bentoml serve` of the Bento `mlkit build` made (auth off, the prediction log on, as deployed);
  - mlkit unbatched: the same Bento with `MLKIT_SERVE__BATCHING=false`;
  - regression batched and unbatched: the diabetes Bento, the same two ways (answers `{value}`, a value histogram);
  - BentoML idiomatic: `bench/peers/penguins_bentoml` (a `@bentoml.service` with a batchable API, mlkit's
    max_batch_size / max_latency_ms, 1 worker) loading the same bundle: the "what would I get instead" peer;
  - LitServe batched and unbatched: `bench/peers/penguins_litserve.py` in its own venv (MLKIT_BENCH_LITSERVE_PYTHON);
  - ceiling: `bench/peers/penguins_ceiling.py`, mlkit's own per-request work in a plain Starlette app on uvicorn (no
    BentoML, no prediction log): mlkit batched over it is what the framework and the log cost;
  - BentoML identity (information): a service that echoes its rows through BentoML's API route with the same `[serve]`
    settings; `mlflow models serve --env-manager local` of the same registered version (information).
EVERY service runs in ROUNDS interleaved rounds (a, b, c, ..., a, b, c, ...), each round a fresh process warmed up for
WARMUP seconds, then each of its cases (concurrency x rows per request) for SECONDS; each figure is the median round
(every round in the detail; a p99 figure, the median of the rounds' p99). Then, in the same run:
  - open-loop load (`bench/openloop.py`): requests on a fixed schedule at 70% of mlkit unbatched's 1-row capacity at 32
    connections (its median round above), timed from their scheduled send; mlkit batched p99 vs unbatched p99 (peers
    as information), the generator's late sends and CPU in the detail;
  - cold start: process start (`Popen`) to the first 200 on the readiness probe (polled every 10 ms), mlkit's Bento vs
    the idiomatic BentoML service (LitServe as information), COLD_STARTS interleaved starts each, median;
  - where a 100-row request's time goes in mlkit: the functions the service calls (parse, validate, transform, forward,
    encode, log) timed in-process on a 100-row body, many repetitions.
Non-2xx and socket-error counts and the client's own CPU use are in each case's detail; mlkit's share of non-2xx answers;
whether every row mlkit answered (its `mlkit_rows_total`, read from `/metrics` before the stop: wrk leaves the requests
in flight at the end uncounted) reached the prediction log.
Clients keep their connections open (HTTP/1.1 keep-alive). `ab` cannot measure that here: its `-k` is HTTP/1.0
keep-alive, which uvicorn refuses (`connection: close`).
Knobs: MLKIT_BENCH_SERVE_SECONDS (per case), MLKIT_BENCH_SERVE_ROUNDS, MLKIT_BENCH_COLD_STARTS, MLKIT_BENCH_OPENLOOP_SECONDS,
MLKIT_BENCH_LITSERVE_PYTHON, MLKIT_BENCH_LITSERVE_BATCH_TIMEOUT (LitServe's fill window, seconds).
"""
import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PEERS = REPO / "bench" / "peers"
ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}
DIABETES_ROW = {"age": 59, "sex": "2", "bmi": 32.1, "bp": 101.0, "s1": 157.0, "s2": 93.2, "s3": 38.0, "s4": 4.0, "s5": 4.8598, "s6": 87.0}
CASES = [(32, 1), (64, 1), (32, 100), (64, 100)]  # (concurrency, rows per request)
ONE_ROW = CASES[:2]
SECONDS = int(os.environ.get("MLKIT_BENCH_SERVE_SECONDS", 5))  # per case and server (wrk takes whole seconds)
ROUNDS = int(os.environ.get("MLKIT_BENCH_SERVE_ROUNDS", 3))  # interleaved rounds of every service
LAZY_PEER = "BentoML, torch imported in __init__"  # the idiomatic peer's cold start with its imports moved (information)
COLD_STARTS = int(os.environ.get("MLKIT_BENCH_COLD_STARTS", 3))
OPEN_SECONDS = float(os.environ.get("MLKIT_BENCH_OPENLOOP_SECONDS", 5))
OPEN_SHARE = 0.7  # of mlkit unbatched's 1-row capacity at 32 connections
LITSERVE_PY = Path(os.environ.get("MLKIT_BENCH_LITSERVE_PYTHON", REPO / ".venv-litserve" / "bin" / "python"))
LITSERVE_WINDOW = os.environ.get("MLKIT_BENCH_LITSERVE_BATCH_TIMEOUT", "0.005")
SERVER_CPU, CLIENT_CPU = "0", "1"
SERVER_LOG = REPO / "bench" / "reports" / "serving-servers.log"  # every server's output, for when a figure looks wrong
WARMUP = 2  # seconds of 1-row requests at 8 connections before the cases, answered (and logged) like any other

IDENTITY = '''
from typing import Any
import bentoml
from mlkit import service
from mlkit.config import current_settings

S = current_settings().serve  # the same [serve] settings as mlkit's service: workers, access log, tracing, batching

@bentoml.service(name="identity", **service.service_config())
class Identity:
    # BentoML's own adaptive batching with mlkit's limits (rows merged across requests), or none
    @(bentoml.api(batchable=True, batch_dim=0, max_batch_size=S.max_batch_size, max_latency_ms=S.max_latency_ms)
      if S.batching else bentoml.api)
    async def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return rows
'''

RAW = '''
import json, os
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from mlkit.predictor import Predictor

predictor = Predictor.from_bundle(os.environ["RAW_BUNDLE"], "penguins", "1")

async def predict(request):
    rows = json.loads(await request.body())["rows"]
    return JSONResponse({"model": "penguins", "version": "1", "predictions": predictor.predict(rows)})

async def readyz(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])
'''  # the ceiling's stand-in while bench/peers/penguins_ceiling.py does not exist


WRK_SCRIPT = r"""-- POST the file named by WRK_BODY; print the summary as one JSON line
local f = assert(io.open(os.getenv("WRK_BODY"), "rb")); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"complete": %d, "us": %d, "non_2xx": %d, "failed": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def load(url: str, body: Path, concurrency: int, seconds: int) -> dict:
    "Run `wrk` (one thread, `concurrency` keep-alive connections) pinned to the client CPU; its summary and its own CPU use."
    script = body.parent / "post.lua"
    if not script.exists(): script.write_text(WRK_SCRIPT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s",
                          "-s", str(script), url], capture_output=True, text=True, timeout=600, env={**os.environ, "WRK_BODY": str(body)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^WRK (\{.*\})$", out.stdout, re.M)
    if not m: raise RuntimeError(f"wrk printed no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(m.group(1))
    secs = r.pop("us") / 1e6
    # requests/s counts answered (2xx) requests only: a peer's fast errors are no throughput
    r.update(rps=(r["complete"] - r["non_2xx"]) / secs, p50_ms=r.pop("p50_us") / 1000, p99_ms=r.pop("p99_us") / 1000,
             client_cpu=(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / secs)
    return r


def open_load(url: str, body: Path, rate: float, seconds: float, out: Path) -> dict:
    "`bench/openloop.py` pinned to the client CPU: `rate` requests/s on a fixed schedule for `seconds`; its figures."
    subprocess.run(["taskset", "-c", CLIENT_CPU, sys.executable, str(REPO / "bench" / "openloop.py"), "--url", url, "--body", str(body),
                    "--rate", str(rate), "--seconds", str(seconds), "--out", str(out)], check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def answered_rows(url: str) -> float:
    """Rows the service answered (its `mlkit_rows_total`, every model and role but the shadow), from `/metrics`, once the
    count holds still for a second (requests queued when wrk stopped are still scored, counted and logged)."""
    def read():
        with urllib.request.urlopen(url + "/metrics", timeout=30) as f: text = f.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("mlkit_rows_total{") and 'answered_by="shadow"' not in line)
    last = read()
    for _ in range(30):
        time.sleep(1)
        if (now := read()) == last: return now
        last = now
    raise RuntimeError(f"{url}: mlkit_rows_total still moving after 30 s")


def median_round(rounds: list[dict]) -> dict:
    """Per case, the round with the median requests/s (all rounds kept under `rounds`, in run order), with the median of the rounds' p99
    (`p99_ms_median`, what a p99 figure shows); counts summed over the rounds."""
    out = {}
    for case in rounds[0]:
        runs = [r[case] for r in rounds]  # in run order: round i of one service ran beside round i of every other
        mid = dict(sorted(runs, key=lambda r: r["rps"])[len(runs) // 2])
        mid.update(non_2xx=sum(r["non_2xx"] for r in runs), failed=sum(r["failed"] for r in runs), complete=sum(r["complete"] for r in runs),
                   p99_ms_median=statistics.median(r["p99_ms"] for r in runs),  # a p99 figure: the median of the rounds' p99
                   rounds=[{k: r[k] for k in ("rps", "rows_per_s", "p50_ms", "p99_ms")} for r in runs])
        out[case] = mid
    return out


def first_200(url: str, proc: subprocess.Popen, timeout: float = 180, every: float = 0.01) -> float:
    "Poll `url` every `every` seconds until it answers 200; the monotonic time it did. Raises if `proc` exits or time runs out."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None: raise RuntimeError(f"{url}: the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200: return time.monotonic()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError): pass
        time.sleep(every)
    raise RuntimeError(f"{url}: no 200 after {timeout} s")


@contextlib.contextmanager
def served(cmd: list, env: dict, cwd: Path, port: int, ready: str, log: Path):
    "A server pinned to the server CPU, up once its probe answers 200: yields (url, seconds from Popen to that 200); stopped after."
    from mlkit.deploy import stop_service
    t0 = time.monotonic()
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try: yield url, first_200(url + ready, proc) - t0
    finally: stop_service(proc, timeout=60)


def measure(label: str, srv: dict, port: int, bodies: dict, count=None) -> tuple[dict, dict]:
    "Start a server, warm it up, run its cases, stop it. Returns the cases' figures and {warmup, answered (`count(url)`), start_s}."
    with served(srv["cmd"](port), srv["env"], srv["cwd"], port, srv["ready"], SERVER_LOG) as (url, start_s):
        route = srv["route"]
        extra = {"warmup": load(url + route, bodies[1], 8, WARMUP), "start_s": start_s}
        res = {}
        for c, rows in srv["cases"]:
            r = load(url + route, bodies[rows], c, SECONDS)
            r["rows_per_s"] = r["rps"] * rows
            res[(c, rows)] = r
            print(f"{label:20s} c={c:<3d} rows={rows:<4d} {r['rps']:8.0f} rps {r['rows_per_s']:9.0f} rows/s "
                  f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms non-2xx {r['non_2xx']} failed {r['failed']} "
                  f"client CPU {100 * r['client_cpu']:.0f}%", flush=True)
        if count: extra["answered"] = count(url)
        return res, extra


def bench_project(root: Path):
    "A throwaway project in `root` over the repo's notebooks and services: its settings file, environment and an `mlkit` runner."
    ini = root / "settings.ini"
    ini.write_text(f"[project]\nstate_dir = state\ntrain_dir = {REPO / 'nbs/train'}\nbentos_dir = {REPO / 'bentos'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
    env.update(MLKIT_SETTINGS=str(ini), PATH=f"{BIN}:{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    run = lambda *a: subprocess.run([str(BIN / "mlkit"), *a], env=env, cwd=root, check=True, capture_output=True, text=True).stdout
    return ini, env, run


def request_steps(p, s, body: bytes, reps: int) -> tuple[dict, list]:
    """Microseconds (median of `reps`) that each function mlkit's service calls for one `/predict` of `body` takes, in-process:
    parse (`guard.parse_body`), validate (`Predictor.validate`), transform (`features.record_inputs`), forward (`Predictor.scores`:
    the pass and its decoding), labels (argmax and class names), encode (`Predictor.format_json` and the answer's bytes), log
    (`PredictionLog.log`: queueing the rows), and the log's writer (CPU per request off the request path, on the same core).
    Returns the steps and the validated rows. Used by `breakdown` here and by bench_images."""
    from mlkit.features import record_inputs
    from mlkit.guard import parse_body
    from mlkit.predlog import prediction_log
    head = json.dumps({"model": p.name, "version": p.version, "answered_by": "champion"})[:-1] + ', "predictions": '
    steps = {}
    def timed(name, f):
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); out = f(); ts.append(time.perf_counter() - t)
        steps[name] = round(1e6 * statistics.median(ts), 1)
        return out
    rows, _ = timed("parse", lambda: parse_body(body, s.serve.max_json_depth))
    rows = timed("validate", lambda: p.validate(rows, s.serve.max_rows))
    X = timed("transform", lambda: record_inputs(p.spec, p.tensors, rows))
    proba = timed("forward", lambda: p.scores(X))
    top, labels = timed("labels", lambda: (proba.argmax(1).tolist(), p.labels(proba)))
    timed("encode", lambda: (head + p.format_json(proba, top) + "}").encode())
    log = prediction_log(p, s)
    c0, w0 = time.process_time(), time.perf_counter()
    timed("log", lambda: log.log(rows, {"model": p.name, "version": p.version}, "bench", "champion", proba, labels))
    queued = time.perf_counter() - w0
    log.close()  # the writer's CPU: what the process spent beyond the queueing, per request
    steps["log writer (CPU, off the request path)"] = round(1e6 * max(0.0, time.process_time() - c0 - queued) / reps, 1)
    return steps, rows


def breakdown(bundle: str, reps: int = 400) -> dict:
    """The in-process breakdown (`request_steps`) of one 100-row `/predict`, then `ModelServer.answer` whole (unbatched:
    validate, score on the model thread, count, log, encode)."""
    import asyncio
    import torch
    from mlkit.config import current_settings
    from mlkit.predictor import Predictor
    s = current_settings()
    torch.set_num_threads(s.serve.threads)
    p = Predictor.from_bundle(bundle, "penguins", "1")
    steps, rows = request_steps(p, s, json.dumps({"rows": [ROW] * 100}).encode(), reps)
    name = "ModelServer.answer whole (unbatched, no parse)"
    try:
        from mlkit.service import ModelServer
        server = ModelServer(p, settings=s)
        loop = asyncio.new_event_loop()
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); loop.run_until_complete(server.answer(rows, "bench")); ts.append(time.perf_counter() - t)
        steps[name] = round(1e6 * statistics.median(ts), 1)
        loop.run_until_complete(server.aclose())
    except Exception as e: steps[name] = f"failed: {type(e).__name__}: {e}"
    return {"reps": reps, "rows": 100, "us": steps}


def servers(bento: dict, root: Path, bundle: Path, env: dict) -> dict:
    "Every service of the rounds: its command (given a port), extra environment, working folder, readiness path, route, body kind and cases."
    bentoml_serve = lambda target: lambda p: [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(p)]
    peers = {"PENGUINS_BUNDLE": str(bundle), "RAW_BUNDLE": str(bundle)}
    ceiling = PEERS / "penguins_ceiling.py"
    uvicorn = lambda app, *pre: lambda p: [str(BIN / "uvicorn"), *pre, app, "--host", "127.0.0.1", "--port", str(p), "--workers", "1",
                                           "--log-level", "warning", "--no-access-log"]
    litserve = lambda *a: lambda p: [str(LITSERVE_PY), str(PEERS / "penguins_litserve.py"), "--port", str(p), *a]
    S = lambda cmd, extra=None, cwd=root, ready="/readyz", kind="rows", cases=CASES, route="/predict": dict(
        cmd=cmd, env={**env, **peers, **(extra or {})}, cwd=cwd, ready=ready, kind=kind, cases=cases, route=route)
    out = {
        "mlkit batched": S(bentoml_serve(bento["penguins"]), {"MLKIT_SERVE__BATCHING": "true"}),
        "mlkit unbatched": S(bentoml_serve(bento["penguins"]), {"MLKIT_SERVE__BATCHING": "false"}, cases=ONE_ROW),
        "BentoML idiomatic": S(bentoml_serve("."), cwd=PEERS / "penguins_bentoml", cases=ONE_ROW),
        "LitServe batched": S(litserve("--batched", "--batch-timeout", LITSERVE_WINDOW), ready="/health", cases=ONE_ROW),
        "LitServe unbatched": S(litserve(), ready="/health", cases=ONE_ROW),
        "ceiling": S(uvicorn("penguins_ceiling:app", "--app-dir", str(PEERS)) if ceiling.exists() else uvicorn("raw_app:app")),
        "regression batched": S(bentoml_serve(bento["diabetes"]), {"MLKIT_SERVE__BATCHING": "true"}, kind="regression"),
        "regression unbatched": S(bentoml_serve(bento["diabetes"]), {"MLKIT_SERVE__BATCHING": "false"}, kind="regression"),
        "BentoML identity": S(bentoml_serve("."), cwd=root / "identity"),
        "mlflow models serve": S(lambda p: [str(BIN / "mlflow"), "models", "serve", "-m", "models:/penguins@champion", "--env-manager",
                                            "local", "-h", "127.0.0.1", "-p", str(p), "-w", "1"], ready="/ping", kind="mlflow", route="/invocations"),
    }
    if not LITSERVE_PY.exists():
        print(f"LitServe's python {LITSERVE_PY} is missing (MLKIT_BENCH_LITSERVE_PYTHON): its figures are missed", flush=True)
        del out["LitServe batched"], out["LitServe unbatched"]
    return out


def main(out: Path):
    from mlkit.config import load_settings, tool_env
    from mlkit.deploy import free_port
    from mlkit.predlog import read_prediction_log
    if not shutil.which("wrk"): raise SystemExit("wrk is missing: `make bench` installs Debian's wrk")
    SERVER_LOG.parent.mkdir(exist_ok=True)
    SERVER_LOG.write_text("")
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ini, env, run = bench_project(root)
        bentos = {}
        for name in ("penguins", "diabetes"):
            run("train", name, "-f", str(REPO / f"nbs/train/{name}.yaml"))
            run("models", "promote", name)
            bentos[name] = run("build", name).strip().splitlines()[-1]
        settings = load_settings(ini, env={})
        env.update(tool_env(settings))
        bodies = {}
        for rows in (1, 100):
            for kind, key, row in (("rows", "rows", ROW), ("mlflow", "dataframe_records", ROW), ("regression", "rows", DIABETES_ROW)):
                p = root / f"{kind}_{rows}.json"
                p.write_text(json.dumps({key: [row] * rows}))
                bodies.setdefault(kind, {})[rows] = p
        (root / "identity").mkdir()
        (root / "identity" / "service.py").write_text(IDENTITY)
        (root / "raw_app.py").write_text(RAW)
        bundle = root / "bundle"
        subprocess.run([sys.executable, "-c", f"import mlkit.config as c; c.configure(); from mlkit.registry import download_bundle; "
                        f"download_bundle('penguins', alias='champion', dst={str(bundle)!r})"], env=env, check=True)
        logs_of = lambda label: root / "state" / "predictions" / ("diabetes" if label.startswith("regression") else "penguins")
        srv = servers(bentos, root, bundle, env)
        logged, answered, rounds, warmups, starts = {}, {}, {}, {}, {}
        t_rounds = time.monotonic()
        for _ in range(ROUNDS):
            for label, s in srv.items():
                port = free_port()
                logs = logs_of(label)
                mine = label.startswith(("mlkit", "regression"))
                before = len(read_prediction_log(logs)) if mine and logs.exists() else 0
                res, more = measure(label, s, port, bodies[s["kind"]], answered_rows if mine else None)
                rounds.setdefault(label, []).append(res)
                warmups.setdefault(label, []).append(more["warmup"])
                starts.setdefault(label, []).append(more["start_s"])
                if mine:  # stopped cleanly: the log writer has flushed
                    logged[label] = logged.get(label, 0) + (len(read_prediction_log(logs)) if logs.exists() else 0) - before
                    answered[label] = answered.get(label, 0) + more["answered"]
        results = {label: median_round(r) for label, r in rounds.items()}
        t_open = time.monotonic()
        # open loop: a fixed schedule at 70% of mlkit unbatched's 1-row capacity measured above
        rate = OPEN_SHARE * results["mlkit unbatched"][(32, 1)]["rps"]
        opened = {}
        for label in ("mlkit batched", "mlkit unbatched", "BentoML idiomatic", "LitServe batched",
                      "LitServe unbatched", "ceiling"):
            if label not in srv: continue
            s, port = srv[label], free_port()
            with served(s["cmd"](port), s["env"], s["cwd"], port, s["ready"], SERVER_LOG) as (url, _):
                load(url + s["route"], bodies["rows"][1], 8, WARMUP)
                r = opened[label] = open_load(url + s["route"], bodies["rows"][1], rate, OPEN_SECONDS, root / "open.json")
                print(f"open loop {label:20s} {rate:.0f}/s sent {r['sent']} completed {r['completed']} errors {r['errors']} "
                      f"p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms late>1ms {r['late_over_1ms']} client CPU {100 * r['client_cpu']:.0f}%", flush=True)
        t_cold = time.monotonic()
        # cold start: Popen to the first 200 on the readiness probe, interleaved starts
        cold = {}
        for _ in range(COLD_STARTS):
            for label in ("mlkit batched", "BentoML idiomatic", LAZY_PEER, "LitServe batched"):
                if label not in srv and label != LAZY_PEER: continue
                s, port = srv.get(label) or {**srv["BentoML idiomatic"], "env": {**srv["BentoML idiomatic"]["env"], "PENGUINS_IMPORT_IN_INIT": "1"}}, free_port()
                with served(s["cmd"](port), s["env"], s["cwd"], port, s["ready"], SERVER_LOG) as (url, secs):
                    cold.setdefault(label, []).append(secs)
                print(f"cold start {label:20s} {secs:.2f} s", flush=True)
        t_breakdown = time.monotonic()
        bd_env = {**env, "MLKIT_PROJECT__STATE_DIR": str(root / "breakdown-state"), "MLKIT_SERVE__BATCHING": "false"}
        bd = json.loads(subprocess.run(["taskset", "-c", SERVER_CPU, sys.executable, __file__, "--breakdown", str(bundle)], env=bd_env,
                                       check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"breakdown of a 100-row request (us): {bd['us']}", flush=True)
    phases = {"rounds_s": t_open - t_rounds, "open_loop_s": t_cold - t_open, "cold_start_s": t_breakdown - t_cold,
              "breakdown_s": time.monotonic() - t_breakdown, "total_s": time.monotonic() - t_start}
    out.write_text(json.dumps(figures(results, warmups, starts, logged, answered, opened, rate, cold, bd, phases)))


def fig(name, unit, mine, theirs, case, key, limit, label, op=">="):
    "A figure of `mine` against `theirs` (median rounds) at `case`; `limit`: the target ratio (None: information)."
    f = {"name": name, "unit": unit, "value": mine[case][key], "baseline": theirs[case][key] if theirs else None, "baseline_label": label,
         "detail": {"mlkit": mine[case], "peer": theirs[case] if theirs else None}}
    if theirs is None: f["baseline_text"] = f"{label}: not measured (LitServe's venv missing?)"
    if limit: f["target"] = {"of": "ratio", "op": op, "limit": limit}
    rk = "p99_ms" if key.startswith("p99") else key
    if key.startswith("p99"): f["detail"]["round_key"] = rk  # which value of each round the report should list
    if theirs and "rounds" in mine[case] and "rounds" in theirs[case]:  # the same round's pair: the drift of a shared box cancels
        pairs = [a[rk] / b[rk] for a, b in zip(mine[case]["rounds"], theirs[case]["rounds"]) if b[rk]]
        f["detail"]["paired_round_ratios"] = [round(x, 3) for x in pairs]
        f["detail"]["median_paired_ratio"] = round(statistics.median(pairs), 3) if pairs else None
    return f


def figures(results, warmups, starts, logged, answered, opened, rate, cold, bd, phases) -> list[dict]:
    "The report's figures from the run's measurements."
    figs = []
    R = results.get
    mk, ub, bi, ident, mlf, ceil = (R(k) for k in ("mlkit batched", "mlkit unbatched", "BentoML idiomatic", "BentoML identity",
                                                   "mlflow models serve", "ceiling"))
    rb, ru = R("regression batched"), R("regression unbatched")
    for c, rows in CASES:
        tag = f"{rows}-row requests, {c} clients"
        if rows == 1:
            figs.append(fig(f"mlkit batched req/s vs BentoML idiomatic, {tag}", "req/s", mk, bi, (c, rows), "rps", 3.0, "BentoML idiomatic"))
            ls = [(k, R(k)) for k in ("LitServe batched", "LitServe unbatched") if R(k)]
            best_label, best = max(ls, key=lambda kv: kv[1][(c, rows)]["rps"]) if ls else ("LitServe", None)
            f = fig(f"mlkit batched req/s vs LitServe's best, {tag}", "req/s", mk, best, (c, rows), "rps", 3.0, best_label)
            f["detail"]["litserve"] = {k: v[(c, rows)] for k, v in ls}
            figs.append(f)
            figs.append(fig(f"mlkit batched p99 vs BentoML idiomatic p99, {tag}", "ms", mk, bi, (c, rows), "p99_ms_median", 1.0, "BentoML idiomatic", "<="))
            figs.append(fig(f"mlkit batched p99 vs LitServe's best p99, {tag}", "ms", mk, best, (c, rows), "p99_ms_median", 1.0, best_label, "<="))
            figs.append(fig(f"mlkit batched req/s vs unbatched, {tag}", "req/s", mk, ub, (c, rows), "rps", 1.5, "mlkit unbatched"))
            figs.append(fig(f"mlkit batched req/s vs BentoML identity (info), {tag}", "req/s", mk, ident, (c, rows), "rps", None, "BentoML identity"))
            figs.append(fig(f"mlkit batched req/s vs mlflow models serve (info), {tag}", "req/s", mk, mlf, (c, rows), "rps", None, "mlflow models serve"))
            figs.append(fig(f"mlkit batched rows/s vs the ceiling app (info), {tag}", "rows/s", mk, ceil, (c, rows), "rows_per_s", None, "ceiling"))
        else:
            figs.append(fig(f"mlkit batched rows/s vs the ceiling app, {tag}", "rows/s", mk, ceil, (c, rows), "rows_per_s", 0.9, "ceiling"))
            figs.append(fig(f"mlkit batched rows/s vs mlflow models serve (info), {tag}", "rows/s", mk, mlf, (c, rows), "rows_per_s", None, "mlflow models serve"))
        # the regression (diabetes) served the same ways, against the baselines of this same run
        figs.append(fig(f"regression batched rows/s vs BentoML identity (info), {tag}", "rows/s", rb, ident, (c, rows), "rows_per_s",
                        None, "BentoML identity"))
        figs.append(fig(f"regression unbatched rows/s vs BentoML identity (info), {tag}", "rows/s", ru, ident, (c, rows), "rows_per_s", None, "BentoML identity"))
        figs.append(fig(f"regression batched rows/s vs the classifier batched, {tag}", "rows/s", rb, mk, (c, rows), "rows_per_s", None, "mlkit batched"))
        if rows == 1: figs.append(fig(f"regression batched req/s vs unbatched, {tag}", "req/s", rb, ru, (c, rows), "rps", 1.5, "regression unbatched"))
    for label in ("mlkit batched", "mlkit unbatched", "regression batched", "regression unbatched"):  # counts summed over every round, warm-ups included
        runs = [*results[label].values(), *warmups[label]]
        total, bad = sum(r["complete"] for r in runs), sum(r["non_2xx"] + r["failed"] for r in runs)
        figs.append({"name": f"{label}: non-2xx answers / requests", "unit": "%", "value": 100 * bad / total, "baseline": None,
                     "detail": {"requests": total, "non_2xx_or_failed": bad}, "target": {"of": "value", "op": "<=", "limit": 0.1}})
        # the service's own count of answered rows: wrk stops with requests in flight that it never counts
        figs.append({"name": f"{label}: rows in the prediction log / rows answered", "unit": "x", "value": logged[label] / answered[label],
                     "baseline": None, "detail": {"logged": logged[label], "answered": answered[label]},
                     "target": {"of": "value", "op": ">=", "limit": 1.0}})
    # open loop
    ob, ou = opened.get("mlkit batched"), opened.get("mlkit unbatched")
    figs.append({"name": f"open loop at 70% of mlkit unbatched's capacity ({rate:.0f} req/s, 1-row): mlkit batched p99 vs unbatched p99",
                 "unit": "ms", "value": ob["p99_ms"], "baseline": ou["p99_ms"], "baseline_label": "mlkit unbatched",
                 "target": {"of": "ratio", "op": "<=", "limit": 1.0}, "detail": {"rate": rate, "seconds": OPEN_SECONDS, "runs": opened}})
    for label, r in opened.items():
        if label.startswith("mlkit"): continue
        figs.append({"name": f"open loop at {rate:.0f} req/s (info): mlkit batched p99 vs {label} p99", "unit": "ms", "value": ob["p99_ms"],
                     "baseline": r["p99_ms"], "baseline_label": label, "detail": {"mlkit": ob, "peer": r}})
    # cold start
    med = {k: statistics.median(v) for k, v in cold.items()}
    for label, limit in (("BentoML idiomatic", 1.0), (LAZY_PEER, None), ("LitServe batched", None)):
        if label not in med and limit is None: continue
        f = {"name": f"cold start to the first 200 on the probe: mlkit's Bento vs {label}{'' if limit else ' (info)'}", "unit": "s",
             "value": med["mlkit batched"], "baseline": med.get(label), "baseline_label": label,
             "detail": {"starts": cold, "median": med, "probe": "/readyz (LitServe: /health), polled every 10 ms from Popen"}}
        if limit: f["target"] = {"of": "ratio", "op": "<=", "limit": limit}
        figs.append(f)
    # where a 100-row request's time goes
    us = bd["us"]
    parts = [k for k in ("parse", "validate", "transform", "forward", "labels", "encode", "log") if isinstance(us.get(k), (int, float))]
    total = sum(us[k] for k in parts)
    figs.append({"name": "a 100-row request in mlkit, in-process (parse, validate, transform, forward, labels, encode, log)", "unit": "us",
                 "value": total, "baseline": None,
                 "text": f"{total:.0f} us: " + ", ".join(f"{k} {us[k]:.0f} ({100 * us[k] / total:.0f}%)" for k in parts),
                 "detail": {**bd, "ceiling_rows_per_s": {f"{c[0]}x{c[1]}": ceil[c]["rows_per_s"] for c in ceil if c[1] == 100} if ceil else None,
                            "phases": phases, "start_s": starts}})
    return figs


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--breakdown", help="a bundle folder: print the in-process breakdown of a 100-row request as JSON, and exit")
    a = ap.parse_args()
    if a.breakdown: print(json.dumps(breakdown(a.breakdown)))
    else: main(a.out)
