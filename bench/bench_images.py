"""Serving images: the digits CNN (8x8 grey images, `mlkit.models.SmallCNN`, trained here with its CI parameters) served
by its Bento batched and unbatched, against the same CNN in a plain Starlette app on uvicorn (the same per-request work:
the image decoded and checked, the forward pass, the same JSON encoder; no BentoML, no prediction log, no batching), all
in interleaved rounds in one run, driven by `wrk` as `bench_serving` drives the tabular services (server on CPU 0, client
on CPU 1). Images are sent as pixel arrays, 1 and 32 per request, at 32 connections; figures are images/s with p50/p99
in the detail, each the median of its rounds."""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import BIN, REPO, ROUNDS, SERVER_LOG, bench_project, fig, measure, median_round  # noqa: E402

CASES = [(32, 1), (32, 32)]  # (connections, images per request)

RAW = '''
import json, os
import torch
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from mlkit.predictor import Predictor

torch.set_num_threads(1)  # as the service's [serve] threads
predictor = Predictor.from_bundle(os.environ["RAW_BUNDLE"], "digits", "1")

async def predict(request):
    rows = predictor.validate(json.loads(await request.body())["rows"])
    out = predictor.predict_proba(rows)
    return Response('{"model": "digits", "version": "1", "predictions": ' + predictor.format_json(out) + "}", media_type="application/json")

async def readyz(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])
'''


def main(out: Path):
    from mlkit.config import load_settings, tool_env
    from mlkit.data import load_digits
    from mlkit.deploy import free_port
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
        (root / "raw_cnn.py").write_text(RAW)
        bundle = root / "bundle"
        subprocess.run([sys.executable, "-c", f"import mlkit.config as c; c.configure(); from mlkit.registry import download_bundle; "
                        f"download_bundle('digits', alias='champion', dst={str(bundle)!r})"], env=env, check=True)
        serve = lambda p: [str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(p)]
        servers = [
            ("digits batched", serve, {"MLKIT_SERVE__BATCHING": "true"}),
            ("digits unbatched", serve, {"MLKIT_SERVE__BATCHING": "false"}),
            ("CNN in raw Starlette", lambda p: [str(BIN / "uvicorn"), "raw_cnn:app", "--host", "127.0.0.1", "--port", str(p),
                                                "--workers", "1", "--log-level", "warning", "--no-access-log"], {"RAW_BUNDLE": str(bundle)}),
        ]
        rounds = {}
        for label, cmd, extra in [s for _ in range(ROUNDS) for s in servers]:
            port = free_port()
            res, _ = measure(label, cmd(port), {**env, **extra}, root, port, "/readyz", bodies, SERVER_LOG, cases=CASES)
            rounds.setdefault(label, []).append(res)
        results = {label: median_round(r) for label, r in rounds.items()}
    for r in results.values():
        for (_c, n), v in r.items(): v["images_per_s"] = v["rps"] * n
    bt, ub, raw = (results[k] for k in ("digits batched", "digits unbatched", "CNN in raw Starlette"))
    figs = []
    for c, n in CASES:
        tag = f"{n} image{'s' * (n > 1)} per request, {c} clients"
        figs.append(fig(f"digits batched images/s vs unbatched, {tag}", "images/s", bt, ub, (c, n), "images_per_s", 1.2 if n == 1 else None, "digits unbatched"))
        figs.append(fig(f"digits batched images/s vs the same CNN in raw Starlette, {tag}", "images/s", bt, raw, (c, n), "images_per_s",
                        1.0 if n == 1 else None, "CNN in raw Starlette"))
        figs.append(fig(f"digits unbatched images/s vs the same CNN in raw Starlette, {tag}", "images/s", ub, raw, (c, n), "images_per_s", None, "CNN in raw Starlette"))
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    main(ap.parse_args().out)
