"""Serving images: the digits CNN (8x8 grey images, `mlkit.models.SmallCNN`, trained here with its CI parameters,
registered and built) served by its Bento batched (and unbatched, info), against its peers serving the SAME registered
bundle (downloaded with `mlkit.registry.download_bundle`, loaded with mlkit's `Predictor.from_bundle`), each written as
its docs recommend and runnable alone from bench/peers/ (their docstrings name the docs):
  - an idiomatic BentoML service (`digits_bentoml/service.py`: `@bentoml.api(batchable=True)` with mlkit's
    max_batch_size and max_latency_ms), batched and unbatched, on the project's BentoML;
  - LitServe (`digits_litserve.py`: a LitAPI, `max_batch_size` as mlkit's, `batch_timeout` MLKIT_BENCH_LITSERVE_BATCH_TIMEOUT),
    batched and unbatched, in its own venv (MLKIT_BENCH_LITSERVE_PYTHON, default .venv-litserve/bin/python);
  - the ceiling (info): the same per-request work as mlkit's (`guard.parse_body`, `Predictor.validate`, the forward pass,
    `format_json`) in a plain Starlette app on uvicorn (`digits_ceiling.py`): no BentoML, no prediction log, no batching.
Each peer has 1 worker and 1 torch thread, as mlkit's `[serve]` defaults. All run in MLKIT_BENCH_IMAGES_ROUNDS interleaved
rounds (default 2), driven by `wrk` as `bench_serving` drives the tabular services (server on CPU 0, client on CPU 1),
the same body to all (`{"rows": [{"image": pixel arrays}]}`, JSON as each peer's docs have it), 1 and 32 images per
request at 32 connections; figures are images/s with p50/p99 in the detail, each the median of its rounds (of two: the
better one, for every server alike; every round in the detail). The target: mlkit batched >= 2x the better peer (of
BentoML and LitServe, batched or not) at each size. Then, as information, where a 1- and a 32-image request's time goes
in mlkit (`breakdown`: the functions its service calls, timed in-process on the server's core)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import BIN, REPO, ROUNDS, SERVER_LOG, bench_project, fig, measure, median_round, request_steps  # noqa: E402

CASES = [(32, 1), (32, 32)]  # (connections, images per request)
PEERS = REPO / "bench" / "peers"
IMAGES_ROUNDS = int(os.environ.get("MLKIT_BENCH_IMAGES_ROUNDS", ROUNDS))  # seven servers a round; odd, so the median is a round
LITSERVE = Path(os.environ.get("MLKIT_BENCH_LITSERVE_PYTHON", REPO / ".venv-litserve" / "bin" / "python"))
LITSERVE_WINDOW = os.environ.get("MLKIT_BENCH_LITSERVE_BATCH_TIMEOUT", "0.005")  # seconds a LitServe batch waits to fill


def servers(bento: str, root: Path, bundle: Path, env: dict) -> dict:
    "Every server of a round (in `bench_serving.measure`'s form): its command (given a port), environment, folder, probe, route, cases."
    bentoml = lambda target: lambda p: [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(p)]
    litserve = lambda *a: lambda p: [str(LITSERVE), str(PEERS / "digits_litserve.py"), "--port", str(p), *a]
    uvicorn = lambda p: [str(BIN / "uvicorn"), "--app-dir", str(PEERS), "digits_ceiling:app", "--host", "127.0.0.1", "--port", str(p),
                         "--workers", "1", "--log-level", "warning", "--no-access-log"]
    S = lambda cmd, extra, cwd=root, ready="/readyz": dict(cmd=cmd, env={**env, "DIGITS_BUNDLE": str(bundle), **extra}, cwd=cwd,
                                                           ready=ready, route="/predict", cases=CASES)
    return {
        "digits batched": S(bentoml(bento), {"MLKIT_SERVE__BATCHING": "true"}),
        "digits unbatched": S(bentoml(bento), {"MLKIT_SERVE__BATCHING": "false"}),
        "BentoML batched": S(bentoml("service:Digits"), {"DIGITS_BATCHING": "true"}, PEERS / "digits_bentoml"),
        "BentoML unbatched": S(bentoml("service:Digits"), {"DIGITS_BATCHING": "false"}, PEERS / "digits_bentoml"),
        "LitServe batched": S(litserve("--batched", "--batch-timeout", LITSERVE_WINDOW), {}, ready="/health"),
        "LitServe unbatched": S(litserve(), {}, ready="/health"),
        "CNN ceiling (Starlette)": S(uvicorn, {}),
    }


def breakdown(bundle: str, reps: int = 300) -> dict:
    """Microseconds (median of `reps`) that each function mlkit's service calls for one `/predict` of 1 and of 32 images
    takes, in-process on one core: parse (`guard.parse_body`), validate (`Predictor.validate`: the pixel arrays checked and
    decoded), transform (`features.record_inputs`: the image batch), forward (`Predictor.scores`: the pass and the
    softmax), encode (`Predictor.format_json` and the answer's bytes), log (`PredictionLog.log`: queueing the rows), and the
    log's writer (CPU per request off the request path, on the same core)."""
    import torch
    from mlkit.config import current_settings
    from mlkit.data import load_digits
    from mlkit.predictor import Predictor
    s = current_settings()
    torch.set_num_threads(s.serve.threads)
    p = Predictor.from_bundle(bundle, "digits", "1")
    images = load_digits()["image"].to_numpy()
    bodies = {n: json.dumps({"rows": [{"image": images[i].tolist()} for i in range(n)]}).encode() for n in (1, 32)}
    return {n: {"body_bytes": len(b), "us": request_steps(p, s, b, reps)[0]} for n, b in bodies.items()}


def main(out: Path):
    from mlkit.config import load_settings, tool_env
    from mlkit.data import load_digits
    from mlkit.deploy import free_port
    if not LITSERVE.exists(): raise SystemExit(f"{LITSERVE} is missing: LitServe runs in a venv of its own (MLKIT_BENCH_LITSERVE_PYTHON)")
    SERVER_LOG.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ini, env, run = bench_project(root)
        run("train", "digits", "-f", str(REPO / "nbs/train/digits.yaml"))
        run("models", "promote", "digits")
        bento = run("build", "digits").strip().splitlines()[-1]
        env.update(tool_env(load_settings(ini, env={})))
        images = load_digits()["image"].to_numpy()
        bodies = {}
        for n in (1, 32):
            p = root / f"images_{n}.json"
            p.write_text(json.dumps({"rows": [{"image": images[i].tolist()} for i in range(n)]}))
            bodies[n] = p
        bundle = root / "bundle"
        subprocess.run([sys.executable, "-c", f"import mlkit.config as c; c.configure(); from mlkit.registry import download_bundle; "
                        f"download_bundle('digits', alias='champion', dst={str(bundle)!r})"], env=env, check=True)
        srv = servers(bento, root, bundle, env)
        rounds = {}
        for label, sv in [kv for _ in range(IMAGES_ROUNDS) for kv in srv.items()]:
            res, _ = measure(label, sv, free_port(), bodies)
            rounds.setdefault(label, []).append(res)
        results = {label: median_round(r) for label, r in rounds.items()}
        bd_env = {**env, "MLKIT_PROJECT__STATE_DIR": str(root / "breakdown-state")}
        bd = json.loads(subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--breakdown", str(bundle)], env=bd_env, check=True,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"breakdown (us): {bd}", flush=True)
    for r in results.values():
        for (_c, n), v in r.items():
            v["images_per_s"] = v["rps"] * n
            for one in v.get("rounds", []): one["images_per_s"] = one["rps"] * n  # each round too: the paired ratios read them
    bt, ub, ceil = (results[k] for k in ("digits batched", "digits unbatched", "CNN ceiling (Starlette)"))
    peers = [k for k in results if k.startswith(("BentoML", "LitServe"))]
    figs = []
    for c, n in CASES:
        tag = f"{n} image{'s' * (n > 1)} per request, {c} clients"
        best = max(peers, key=lambda k: results[k][(c, n)]["images_per_s"])
        f = fig(f"digits batched images/s vs the better peer (BentoML or LitServe, batched or not), {tag}", "images/s", bt, results[best],
                (c, n), "images_per_s", 2.0, best)
        f["detail"]["peers"] = {k: results[k][(c, n)] for k in peers}
        figs.append(f)
        for name in ("BentoML", "LitServe"):  # each peer's better configuration, info
            mine = max((k for k in peers if k.startswith(name)), key=lambda k: results[k][(c, n)]["images_per_s"])
            figs.append(fig(f"digits batched images/s vs {name} (its better of batched and unbatched), {tag}", "images/s", bt, results[mine],
                            (c, n), "images_per_s", None, mine))
        figs.append(fig(f"digits batched images/s vs unbatched, {tag}", "images/s", bt, ub, (c, n), "images_per_s", None, "digits unbatched"))
        figs.append(fig(f"digits batched images/s vs the same CNN in a plain Starlette app (ceiling), {tag}", "images/s", bt, ceil, (c, n),
                        "images_per_s", None, "CNN ceiling (Starlette)"))
        figs.append(fig(f"digits unbatched images/s vs the ceiling, {tag}", "images/s", ub, ceil, (c, n), "images_per_s", None, "CNN ceiling (Starlette)"))
    for n, b in bd.items():  # where a request's time goes in mlkit (info)
        us = b["us"]
        parts = ["parse", "validate", "transform", "forward", "encode", "log"]
        total = sum(us[k] for k in parts)
        figs.append({"name": f"a {n}-image request in mlkit, in-process on one core (parse, validate, transform, forward, encode, log)",
                     "unit": "us", "value": total, "baseline": None,
                     "text": f"{total:.0f} us: " + ", ".join(f"{k} {us[k]:.0f} ({100 * us[k] / total:.0f}%)" for k in parts)
                             + f"; log writer {us['log writer (CPU, off the request path)']:.0f} off the path",
                     "detail": {**b, "served_us_per_request": {k: 1e6 / results[k][(32, int(n))]["rps"] for k in results}}})
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--breakdown", help="a bundle folder: print the in-process breakdown of a 1- and a 32-image request as JSON, and exit")
    a = ap.parse_args()
    if a.breakdown: print(json.dumps(breakdown(a.breakdown)))
    else: main(a.out)
