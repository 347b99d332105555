"""The LitServe service of the registered penguins model, batched or not: what a LitServe user would write instead of mlkit.

Written from LitServe's docs: the README / "LitAPI" reference (https://lightning.ai/docs/litserve/api-reference/litapi:
`setup` loads the model once, `decode_request` -> `predict` -> `encode_response`, `LitServer(api, accelerator=...,
workers_per_device=...)`, `server.run(port=...)`) and "Batching" (https://lightning.ai/docs/litserve/features/batching:
`LitAPI(max_batch_size=..., batch_timeout=...)` with `batch` / `unbatch` for inputs that are not tensors). LitServe
0.2.19 (the version checked) takes the batch limits on `LitAPI`. It loads the SAME bundle mlkit serves with mlkit's
`Predictor` (record check per request in `decode_request`, one transform and forward pass per batch in `predict`),
`[serve] threads` torch threads, one inference worker on the CPU and one API server process.

Batching: LitServe's production setup from its docs (LitServer's docstring): `max_batch_size` 8 requests
(--max-batch-size) and `fast_queue=True` (--no-fast-queue turns it off); `batch_timeout` is a fill window in LitServe (a batch
waits for it unless full), where mlkit's `max_latency_ms` is a deadline, so the window is its own setting (--batch-timeout,
seconds). Run it alone (the body is mlkit's: `{"rows": [...]}`; it answers `{"predictions": [{label, probabilities}]}`):

    PENGUINS_BUNDLE=/path/to/bundle taskset -c 0 .venv-litserve/bin/python bench/peers/penguins_litserve.py --port 3003 [--batched]
    curl -s -XPOST localhost:3003/predict -H 'content-type: application/json' -d '{"rows": [{"island": "Biscoe",
        "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}]}'
"""
import argparse
import os

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException

from mlkit.config import current_settings
from mlkit.inputs import InvalidInput
from mlkit.predictor import Predictor

S = current_settings().serve


class PenguinsAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(S.threads)  # as mlkit's service sets them
        self.predictor = Predictor.from_bundle(os.environ["PENGUINS_BUNDLE"], "penguins", os.environ.get("PENGUINS_VERSION", "1"))

    def decode_request(self, request):
        try: return self.predictor.validate(request["rows"], S.max_rows)
        except (InvalidInput, KeyError, TypeError) as e: raise HTTPException(422, str(e)) from e

    def batch(self, inputs):  # a list of requests' row lists, kept apart: `predict` scores them in one pass
        return inputs

    def predict(self, x):
        if self.max_batch_size == 1: return self.predictor.predict_proba(x)
        out = self.predictor.predict_proba([r for rows in x for r in rows])
        return np.split(out, np.cumsum([len(rows) for rows in x])[:-1])

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"predictions": self.predictor.format(output)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--batched", action="store_true")
    ap.add_argument("--batch-timeout", type=float, default=0.005)
    # LitServe counts a batch in requests and waits `batch_timeout` for it to fill: its docs' production setup
    # (LitServer's docstring) is max_batch_size=8 with fast_queue=True (ZeroMQ, "for >100 RPS")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--no-fast-queue", action="store_true")
    a = ap.parse_args()
    api = PenguinsAPI(max_batch_size=a.max_batch_size, batch_timeout=a.batch_timeout) if a.batched else PenguinsAPI()
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30, fast_queue=not a.no_fast_queue)
    server.run(host="127.0.0.1", port=a.port, num_api_servers=1, generate_client_file=False, log_level="warning")
