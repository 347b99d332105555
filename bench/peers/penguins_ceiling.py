"""The serving ceiling: mlkit's own per-request work for one model, in a plain Starlette app on uvicorn, and nothing else.

Per request it does what mlkit's service does to answer `POST /predict {"rows": [...]}`: the same body parse
(`mlkit.guard.parse_body`), the same record check (`Predictor.validate`), feature transform and forward pass
(`Predictor.predict_proba`, one pass per request, inline), and the same JSON encoder (`Predictor.format_json`). It has no
BentoML, no middleware, no prediction log, no metrics and no batching: mlkit's service over this app's rows/s is what the
framework, the log and the guard cost. `GET /readyz` answers 200 once the bundle is loaded.

Run it alone (RAW_BUNDLE: a bundle folder, e.g. from `mlkit.registry.download_bundle('penguins', alias='champion', dst=...)`):

    RAW_BUNDLE=/path/to/bundle taskset -c 0 .venv/bin/uvicorn --app-dir bench/peers penguins_ceiling:app \
        --host 127.0.0.1 --port 3001 --workers 1 --log-level warning --no-access-log
    curl -s -XPOST localhost:3001/predict -H 'content-type: application/json' -d '{"rows": [{"island": "Biscoe",
        "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}]}'

Written from Starlette's docs (https://www.starlette.io/applications/, /routing/, /responses/): a `Starlette` app of
`Route`s; the answer is a `Response` of bytes already encoded, as mlkit's service sends. Threads as mlkit's service sets
them (`[serve] threads`, 1 by default); one worker.
"""
import gc
import json
import os

import torch
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from mlkit.config import current_settings
from mlkit.guard import parse_body
from mlkit.inputs import InvalidInput
from mlkit.predictor import Predictor

S = current_settings().serve
torch.set_num_threads(S.threads)  # as mlkit's ModelServer does
predictor = Predictor.from_bundle(os.environ["RAW_BUNDLE"], os.environ.get("RAW_NAME", "penguins"), os.environ.get("RAW_VERSION", "1"))
HEAD = json.dumps({"model": predictor.name, "version": predictor.version, "answered_by": "champion"})[:-1] + ', "predictions": '
gc.collect(); gc.freeze()  # as mlkit's service does once its models are loaded


def _json(status: int, res: dict) -> Response:
    return Response(json.dumps(res).encode(), status_code=status, media_type="application/json")


async def predict(request):
    rows, bad = parse_body(await request.body(), S.max_json_depth)
    if bad is not None: return _json(400, {"error": "bad_request", "detail": bad})
    try: rows = predictor.validate(rows, S.max_rows)
    except InvalidInput as e: return _json(422, {"error": "invalid_input", "detail": str(e), "field": e.field, "row": e.row})
    proba = predictor.predict_proba(rows)
    top = proba.argmax(1).tolist() if predictor.kind == "classification" else None
    return Response((HEAD + predictor.format_json(proba, top) + "}").encode(), media_type="application/json")


async def readyz(request):
    return Response(b"ok", media_type="text/plain")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])
