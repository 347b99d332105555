"""Serving under load: mlkit's Bento (batched and unbatched) against its peers, driven by `ab`, all in one run.

One registered penguins version (trained here with the CI parameters) is served five ways, one at a time, each pinned
to CPU 0 while `ab` runs pinned to CPU 1 (so client and server do not fight over a core):
  - mlkit batched: `bentoml serve` of the Bento `mlkit build` made (auth off, the prediction log on, as deployed);
  - mlkit unbatched: the same Bento with `MLKIT_SERVE__BATCHING=false`;
  - BentoML identity: a service that echoes its rows with the same `[serve]` settings (workers, access log, batching
    through BentoML's own batchable API with the same limits; BentoML's metrics on in both): the framework's floor;
  - `mlflow models serve --env-manager local` of the same registered version;
  - raw: the same Predictor in a plain Starlette app on uvicorn (the ceiling).
Each at 32 and 64 concurrent clients, with 1-row and 100-row requests. Figures: requests/s and rows/s with p50/p99 and
non-2xx counts in the detail; mlkit's share of non-2xx answers; whether every row mlkit answered reached the prediction log.

The three BentoML services (mlkit batched, unbatched, identity) sit near one another and this box is shared and noisy,
so they run in ROUNDS interleaved rounds (batched, unbatched, identity, batched, ...) and each figure is the median of
its rounds (every round in the detail); the far-apart peers (mlflow, raw Starlette) run once.
`ab -k` asks for HTTP/1.0 keep-alive, which uvicorn does not grant (it answers `connection: close`): every request of
every server opens a connection, so connection setup is part of every figure alike.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}
CASES = [(32, 1), (64, 1), (32, 100), (64, 100)]  # (concurrency, rows per request)
REQUESTS = {1: int(os.environ.get("MLKIT_BENCH_SERVE_N1", 6000)), 100: int(os.environ.get("MLKIT_BENCH_SERVE_N100", 1500))}
ROUNDS = int(os.environ.get("MLKIT_BENCH_SERVE_ROUNDS", 3))  # interleaved rounds of the three BentoML services
SERVER_CPU, CLIENT_CPU = "0", "1"
SERVER_LOG = REPO / "bench" / "reports" / "serving-servers.log"  # every server's output, for when a figure looks wrong

IDENTITY = '''
from typing import Any
import bentoml
from mlkit import serving
from mlkit.config import current_settings

S = current_settings().serve  # the same [serve] settings as mlkit's service: workers, access log, tracing, batching

@bentoml.service(name="identity", **serving.service_config())
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
from mlkit.serving import Predictor

predictor = Predictor.from_bundle(os.environ["RAW_BUNDLE"], "penguins", "1")

async def predict(request):
    rows = json.loads(await request.body())["rows"]
    return JSONResponse({"model": "penguins", "version": "1", "predictions": predictor.predict(rows)})

async def readyz(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])
'''


def ab(url: str, body: Path, concurrency: int, n: int) -> dict:
    "Run `ab` (keep-alive, variable-length bodies allowed) pinned to the client CPU; parse its summary."
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, "ab", "-q", "-k", "-l", "-s", "60", "-c", str(concurrency), "-n", str(n),
                          "-p", str(body), "-T", "application/json", url], capture_output=True, text=True, timeout=600).stdout
    num = lambda pat, default=0.0: float(m.group(1)) if (m := re.search(pat, out)) else default
    return {"rps": num(r"Requests per second:\s+([\d.]+)"), "complete": int(num(r"Complete requests:\s+(\d+)")),
            "failed": int(num(r"Failed requests:\s+(\d+)")), "non_2xx": int(num(r"Non-2xx responses:\s+(\d+)")),
            "p50_ms": num(r"\n\s+50%\s+(\d+)"), "p99_ms": num(r"\n\s+99%\s+(\d+)")}


WARMUP = 300  # 1-row requests before the cases, answered (and logged) like any other


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
            route: str = "/predict") -> dict:
    "Start a server pinned to the server CPU, wait for its probe, warm it up, run every case, stop it."
    from mlkit.serving import stop_service, wait_ready
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180, path=ready)
        ab(url + route, bodies[1], 8, WARMUP)  # warm-up
        res = {}
        for c, rows in CASES:
            r = ab(url + route, bodies[rows], c, REQUESTS[rows])
            r["rows_per_s"] = r["rps"] * rows
            res[(c, rows)] = r
            print(f"{label:20s} c={c:<3d} rows={rows:<4d} {r['rps']:8.0f} rps {r['rows_per_s']:9.0f} rows/s "
                  f"p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms non-2xx {r['non_2xx']} failed {r['failed']}", flush=True)
        return res
    finally:
        stop_service(proc, timeout=60)


def main(out: Path):
    from mlkit.config import load_settings, tool_env
    from mlkit.serving import free_port, read_prediction_log
    if not shutil.which("ab"): raise SystemExit("ab is missing: `make bench` installs apache2-utils")
    SERVER_LOG.parent.mkdir(exist_ok=True)
    SERVER_LOG.write_text("")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ini = root / "settings.ini"
        ini.write_text(f"[project]\nstate_dir = state\ntrain_dir = {REPO / 'nbs/train'}\nbentos_dir = {REPO / 'bentos'}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
        env.update(MLKIT_SETTINGS=str(ini), PATH=f"{BIN}:{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true")
        run = lambda *a: subprocess.run([str(BIN / "mlkit"), *a], env=env, cwd=root, check=True, capture_output=True, text=True).stdout
        run("train", "penguins", "-f", str(REPO / "nbs/train/penguins.yaml"))
        run("models", "promote", "penguins")
        bento = run("build", "penguins").strip().splitlines()[-1]
        settings = load_settings(ini, env={})
        env.update(tool_env(settings))
        bodies = {}
        for rows in (1, 100):
            for kind, key in (("rows", "rows"), ("mlflow", "dataframe_records")):
                p = root / f"{kind}_{rows}.json"
                p.write_text(json.dumps({key: [ROW] * rows}))
                bodies.setdefault(kind, {})[rows] = p
        (root / "identity").mkdir()
        (root / "identity" / "service.py").write_text(IDENTITY)
        (root / "raw_app.py").write_text(RAW)
        bundle = root / "bundle"
        subprocess.run([sys.executable, "-c", f"import mlkit.config as c; c.configure(); from mlkit.registry import download_bundle; "
                        f"download_bundle('penguins', alias='champion', dst={str(bundle)!r})"], env=env, check=True)
        logs = root / "state" / "predictions" / "penguins"
        logged, rounds = {}, {}
        bentoml_serve = lambda target: lambda p: [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(p)]
        servers = [
            ("mlkit batched", bentoml_serve(bento), {"MLKIT_SERVE__BATCHING": "true"}, "/readyz", "rows"),
            ("mlkit unbatched", bentoml_serve(bento), {"MLKIT_SERVE__BATCHING": "false"}, "/readyz", "rows"),
            ("BentoML identity", bentoml_serve("."), {}, "/readyz", "rows"),
            ("mlflow models serve", lambda p: [str(BIN / "mlflow"), "models", "serve", "-m", "models:/penguins@champion", "--env-manager", "local",
                                               "-h", "127.0.0.1", "-p", str(p), "-w", "1"], {}, "/ping", "mlflow"),
            ("raw Starlette", lambda p: [str(BIN / "uvicorn"), "raw_app:app", "--host", "127.0.0.1", "--port", str(p), "--workers", "1",
                                         "--log-level", "warning", "--no-access-log"], {"RAW_BUNDLE": str(bundle)}, "/readyz", "rows"),
        ]
        schedule = [s for _ in range(ROUNDS) for s in servers[:3]] + servers[3:]
        for label, cmd, extra, ready, kind in schedule:
            port = free_port()
            before = len(read_prediction_log(logs)) if logs.exists() else 0
            cwd = root / "identity" if label == "BentoML identity" else root
            rounds.setdefault(label, []).append(measure(label, cmd(port), {**env, **extra}, cwd, port, ready, bodies[kind], SERVER_LOG,
                                                        "/invocations" if kind == "mlflow" else "/predict"))
            if label.startswith("mlkit"):  # stopped cleanly: the log writer has flushed
                logged[label] = logged.get(label, 0) + (len(read_prediction_log(logs)) if logs.exists() else 0) - before
        results = {label: median_round(r) for label, r in rounds.items()}
    figs = []
    mk, ub, ident, mlf, raw = (results[k] for k in ("mlkit batched", "mlkit unbatched", "BentoML identity", "mlflow models serve", "raw Starlette"))
    for c, rows in CASES:
        tag = f"{rows}-row requests, {c} clients"
        if rows == 1:
            figs.append(fig(f"mlkit batched req/s vs BentoML identity, {tag}", "req/s", mk, ident, (c, rows), "rps", 1.0, "BentoML identity"))
            figs.append(fig(f"mlkit batched req/s vs mlflow models serve, {tag}", "req/s", mk, mlf, (c, rows), "rps", 2.0, "mlflow models serve"))
            figs.append(fig(f"mlkit batched req/s vs unbatched, {tag}", "req/s", mk, ub, (c, rows), "rps", 1.5, "mlkit unbatched"))
        else:
            figs.append(fig(f"mlkit batched rows/s vs mlflow models serve, {tag}", "rows/s", mk, mlf, (c, rows), "rows_per_s", 2.0, "mlflow models serve"))
        figs.append(fig(f"mlkit batched vs raw Starlette ceiling, {tag}", "rows/s", mk, raw, (c, rows), "rows_per_s", None, "raw Starlette"))
    for label in ("mlkit batched", "mlkit unbatched"):  # counts summed over every round
        total = sum(r["complete"] for r in results[label].values()) + WARMUP * ROUNDS
        bad = sum(r["non_2xx"] + r["failed"] for r in results[label].values())
        figs.append({"name": f"{label}: non-2xx answers / requests", "unit": "%", "value": 100 * bad / total, "baseline": None,
                     "target": {"of": "value", "op": "<=", "limit": 0.1}})
        served = sum((r["complete"] - r["non_2xx"] - r["failed"]) * rows for (c, rows), r in results[label].items()) + WARMUP * ROUNDS
        figs.append({"name": f"{label}: rows in the prediction log / rows answered", "unit": "x", "value": logged[label] / served,
                     "baseline": None, "detail": {"logged": logged[label], "answered": served}, "target": {"of": "value", "op": ">=", "limit": 1.0}})
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
