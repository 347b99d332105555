"""Serving under load: mlkit's Bento (batched and unbatched) against its peers, driven by `wrk`, all in one run.

One registered penguins version (trained here with the CI parameters) is served five ways, one at a time, each pinned
to CPU 0 while `wrk` (one thread) runs pinned to CPU 1 (so client and server do not fight over a core); a registered
diabetes version (the regression, trained here with its CI parameters) is served by its own Bento, batched and
unbatched, in the same interleaved rounds, so its figures have the same baselines measured in the same run:
  - mlkit batched: `bentoml serve` of the Bento `mlkit build` made (auth off, the prediction log on, as deployed);
  - mlkit unbatched: the same Bento with `MLKIT_SERVE__BATCHING=false`;
  - regression batched and unbatched: the diabetes Bento, the same two ways (answers `{value}`, a value histogram);
  - BentoML identity: a service that echoes its rows with the same `[serve]` settings (workers, access log, batching
    through BentoML's own batchable API with the same limits; BentoML's metrics on in both): the framework's floor;
  - `mlflow models serve --env-manager local` of the same registered version;
  - raw: the same Predictor in a plain Starlette app on uvicorn, no middleware, a forward pass per request (the issue's
    "raw ceiling"; batched 1-row requests pass it, since it cannot batch).
Each at 32 and 64 concurrent clients (connections), with 1-row and 100-row requests, for SECONDS each. Figures:
requests/s and rows/s with p50/p99, non-2xx and socket-error counts and the client's own CPU use in the detail; mlkit's
share of non-2xx answers; whether every row mlkit answered (its `mlkit_rows_total`, read from `/metrics` before the stop:
wrk leaves the requests in flight at the end uncounted) reached the prediction log.

The three BentoML services (mlkit batched, unbatched, identity) sit near one another and this box is shared and noisy,
so they run in ROUNDS interleaved rounds (batched, unbatched, identity, batched, ...) and each figure is the median of
its rounds (every round in the detail); the far-apart peers (mlflow, raw Starlette) run once.
Clients keep their connections open (HTTP/1.1 keep-alive, as BentoML's and MLflow's clients, httpx and requests sessions
do). `ab` cannot measure that here: its `-k` is HTTP/1.0 keep-alive, which uvicorn refuses (`connection: close`), so
every `ab` request pays a new connection on every server alike (see the README for the figures it gave).
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}
DIABETES_ROW = {"age": 59, "sex": "2", "bmi": 32.1, "bp": 101.0, "s1": 157.0, "s2": 93.2, "s3": 38.0, "s4": 4.0, "s5": 4.8598, "s6": 87.0}
CASES = [(32, 1), (64, 1), (32, 100), (64, 100)]  # (concurrency, rows per request)
SECONDS = int(os.environ.get("MLKIT_BENCH_SERVE_SECONDS", 5))  # per case and server (wrk takes whole seconds)
ROUNDS = int(os.environ.get("MLKIT_BENCH_SERVE_ROUNDS", 3))  # interleaved rounds of the three BentoML services
SERVER_CPU, CLIENT_CPU = "0", "1"
SERVER_LOG = REPO / "bench" / "reports" / "serving-servers.log"  # every server's output, for when a figure looks wrong

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
'''


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
    r.update(rps=r["complete"] / secs, p50_ms=r.pop("p50_us") / 1000, p99_ms=r.pop("p99_us") / 1000,
             client_cpu=(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / secs)
    return r


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


WARMUP = 2  # seconds of 1-row requests at 8 connections before the cases, answered (and logged) like any other


def median_round(rounds: list[dict]) -> dict:
    "Per case, the round with the median requests/s (all rounds kept under `rounds`); counts summed over the rounds."
    out = {}
    for case in rounds[0]:
        runs = sorted((r[case] for r in rounds), key=lambda r: r["rps"])
        mid = dict(runs[len(runs) // 2])
        mid.update(non_2xx=sum(r["non_2xx"] for r in runs), failed=sum(r["failed"] for r in runs),
                   complete=sum(r["complete"] for r in runs), rounds=[{k: r[k] for k in ("rps", "p50_ms", "p99_ms")} for r in runs])
        out[case] = mid
    return out


def measure(label: str, cmd: list, env: dict, cwd: Path, port: int, ready: str, bodies: dict, log: Path,
            route: str = "/predict", count=None, cases: list | None = None) -> tuple[dict, dict]:
    """Start a server pinned to the server CPU, wait for its probe, warm it up, run every case, stop it. Returns the cases'
    figures and {"warmup": its figures, "answered": `count(url)` read before the stop}."""
    from mlkit.deploy import stop_service, wait_ready
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180, path=ready)
        extra = {"warmup": load(url + route, bodies[1], 8, WARMUP)}
        res = {}
        for c, rows in cases or CASES:
            r = load(url + route, bodies[rows], c, SECONDS)
            r["rows_per_s"] = r["rps"] * rows
            res[(c, rows)] = r
            print(f"{label:20s} c={c:<3d} rows={rows:<4d} {r['rps']:8.0f} rps {r['rows_per_s']:9.0f} rows/s "
                  f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms non-2xx {r['non_2xx']} failed {r['failed']} "
                  f"client CPU {100 * r['client_cpu']:.0f}%", flush=True)
        if count: extra["answered"] = count(url)
        return res, extra
    finally:
        stop_service(proc, timeout=60)


def bench_project(root: Path):
    "A throwaway project in `root` over the repo's notebooks and services: its settings file, environment and an `mlkit` runner."
    ini = root / "settings.ini"
    ini.write_text(f"[project]\nstate_dir = state\ntrain_dir = {REPO / 'nbs/train'}\nbentos_dir = {REPO / 'bentos'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
    env.update(MLKIT_SETTINGS=str(ini), PATH=f"{BIN}:{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
    run = lambda *a: subprocess.run([str(BIN / "mlkit"), *a], env=env, cwd=root, check=True, capture_output=True, text=True).stdout
    return ini, env, run


def main(out: Path):
    from mlkit.config import load_settings, tool_env
    from mlkit.deploy import free_port
    from mlkit.predlog import read_prediction_log
    if not shutil.which("wrk"): raise SystemExit("wrk is missing: `make bench` installs Debian's wrk")
    SERVER_LOG.parent.mkdir(exist_ok=True)
    SERVER_LOG.write_text("")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ini, env, run = bench_project(root)
        bentos = {}
        for name in ("penguins", "diabetes"):
            run("train", name, "-f", str(REPO / f"nbs/train/{name}.yaml"))
            run("models", "promote", name)
            bentos[name] = run("build", name).strip().splitlines()[-1]
        bento = bentos["penguins"]
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
        logged, answered, rounds, warmups = {}, {}, {}, {}
        bentoml_serve = lambda target: lambda p: [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(p)]
        servers = [
            ("mlkit batched", bentoml_serve(bento), {"MLKIT_SERVE__BATCHING": "true"}, "/readyz", "rows"),
            ("mlkit unbatched", bentoml_serve(bento), {"MLKIT_SERVE__BATCHING": "false"}, "/readyz", "rows"),
            ("BentoML identity", bentoml_serve("."), {}, "/readyz", "rows"),
            ("regression batched", bentoml_serve(bentos["diabetes"]), {"MLKIT_SERVE__BATCHING": "true"}, "/readyz", "regression"),
            ("regression unbatched", bentoml_serve(bentos["diabetes"]), {"MLKIT_SERVE__BATCHING": "false"}, "/readyz", "regression"),
            ("mlflow models serve", lambda p: [str(BIN / "mlflow"), "models", "serve", "-m", "models:/penguins@champion", "--env-manager", "local",
                                               "-h", "127.0.0.1", "-p", str(p), "-w", "1"], {}, "/ping", "mlflow"),
            ("raw Starlette", lambda p: [str(BIN / "uvicorn"), "raw_app:app", "--host", "127.0.0.1", "--port", str(p), "--workers", "1",
                                         "--log-level", "warning", "--no-access-log"], {"RAW_BUNDLE": str(bundle)}, "/readyz", "rows"),
        ]
        schedule = [s for _ in range(ROUNDS) for s in servers[:5]] + servers[5:]
        for label, cmd, extra, ready, kind in schedule:
            port = free_port()
            logs = logs_of(label)
            before = len(read_prediction_log(logs)) if logs.exists() else 0
            cwd = root / "identity" if label == "BentoML identity" else root
            mine = label.startswith(("mlkit", "regression"))
            res, more = measure(label, cmd(port), {**env, **extra}, cwd, port, ready, bodies[kind], SERVER_LOG,
                                "/invocations" if kind == "mlflow" else "/predict", answered_rows if mine else None)
            rounds.setdefault(label, []).append(res)
            warmups.setdefault(label, []).append(more["warmup"])
            if mine:  # stopped cleanly: the log writer has flushed
                logged[label] = logged.get(label, 0) + (len(read_prediction_log(logs)) if logs.exists() else 0) - before
                answered[label] = answered.get(label, 0) + more["answered"]
        results = {label: median_round(r) for label, r in rounds.items()}
    figs = []
    mk, ub, ident, mlf, raw = (results[k] for k in ("mlkit batched", "mlkit unbatched", "BentoML identity", "mlflow models serve", "raw Starlette"))
    rb, ru = results["regression batched"], results["regression unbatched"]
    for c, rows in CASES:
        tag = f"{rows}-row requests, {c} clients"
        if rows == 1:
            figs.append(fig(f"mlkit batched req/s vs BentoML identity, {tag}", "req/s", mk, ident, (c, rows), "rps", 1.0, "BentoML identity"))
            figs.append(fig(f"mlkit batched req/s vs mlflow models serve, {tag}", "req/s", mk, mlf, (c, rows), "rps", 2.0, "mlflow models serve"))
            figs.append(fig(f"mlkit batched req/s vs unbatched, {tag}", "req/s", mk, ub, (c, rows), "rps", 1.5, "mlkit unbatched"))
        else:
            figs.append(fig(f"mlkit batched rows/s vs mlflow models serve, {tag}", "rows/s", mk, mlf, (c, rows), "rows_per_s", 2.0, "mlflow models serve"))
        figs.append(fig(f"mlkit batched vs raw Starlette app, {tag}", "rows/s", mk, raw, (c, rows), "rows_per_s", None, "raw Starlette"))
        # the regression (diabetes) served the same ways, against the baselines of this same run
        figs.append(fig(f"regression batched rows/s vs BentoML identity, {tag}", "rows/s", rb, ident, (c, rows), "rows_per_s",
                        1.0 if rows == 1 else None, "BentoML identity"))
        figs.append(fig(f"regression unbatched rows/s vs BentoML identity, {tag}", "rows/s", ru, ident, (c, rows), "rows_per_s", None, "BentoML identity"))
        figs.append(fig(f"regression batched rows/s vs the classifier batched, {tag}", "rows/s", rb, mk, (c, rows), "rows_per_s", None, "mlkit batched"))
        if rows == 1: figs.append(fig(f"regression batched req/s vs unbatched, {tag}", "req/s", rb, ru, (c, rows), "rps", 1.5, "regression unbatched"))
    for label in ("mlkit batched", "mlkit unbatched", "regression batched", "regression unbatched"):  # counts summed over every round, warm-ups included
        runs = [*results[label].values(), *warmups[label]]
        total, bad = sum(r["complete"] for r in runs), sum(r["non_2xx"] + r["failed"] for r in runs)
        figs.append({"name": f"{label}: non-2xx answers / requests", "unit": "%", "value": 100 * bad / total, "baseline": None,
                     "detail": {"requests": total, "non_2xx_or_failed": bad}, "target": {"of": "value", "op": "<=", "limit": 0.1}})
        # the service's own count of answered rows: wrk stops with requests in flight that it never counts (the client's
        # count of 2xx rows, a lower bound, is in the detail)
        ok = lambda r: r["complete"] - r["non_2xx"] - r["failed"]
        seen = sum(ok(r) * rows for (c, rows), r in results[label].items()) + sum(ok(r) for r in warmups[label])
        figs.append({"name": f"{label}: rows in the prediction log / rows answered", "unit": "x", "value": logged[label] / answered[label],
                     "baseline": None, "detail": {"logged": logged[label], "answered": answered[label], "client_saw_2xx": seen},
                     "target": {"of": "value", "op": ">=", "limit": 1.0}})
    out.write_text(json.dumps(figs))


def fig(name, unit, mine, theirs, case, key, limit, label):
    f = {"name": name, "unit": unit, "value": mine[case][key], "baseline": theirs[case][key], "baseline_label": label,
         "detail": {"mlkit": mine[case], "peer": theirs[case]}}
    if limit: f["target"] = {"of": "ratio", "op": ">=", "limit": limit}
    return f


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    main(ap.parse_args().out)
