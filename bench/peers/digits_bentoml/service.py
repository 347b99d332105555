"""The digits CNN (a registered mlkit bundle) as an idiomatic BentoML service: what a BentoML user would write instead of mlkit.

Written from BentoML's docs: "Create online API Services" (https://docs.bentoml.com/en/latest/build-with-bentoml/services.html:
a `@bentoml.service` class that loads its model once in `__init__`, one `@bentoml.api` method) and "Adaptive batching"
(https://docs.bentoml.com/en/latest/guides/adaptive-batching.html: `@bentoml.api(batchable=True, batch_dim=0,
max_batch_size=..., max_latency_ms=...)`, the method taking and returning a list that BentoML merges across requests and
splits back). JSON in and out, typed with Python annotations (BentoML derives its pydantic IO); the body is mlkit's,
`{"rows": [{"image": [[8 rows of 8 pixels]]}, ...]}`, and it answers a list of `{label, probabilities}`.
It loads the SAME bundle mlkit serves (a folder from `mlkit.registry.download_bundle`) with mlkit's `Predictor` (the pixel
arrays checked and decoded, the forward pass, answers as dicts), with mlkit's `[serve]` limits (max_batch_size,
max_latency_ms, threads, max_rows), 1 worker, access log off (mlkit's default); DIGITS_BATCHING=false: a plain `@bentoml.api`.

Run it alone:
    DIGITS_BUNDLE=/path/to/bundle taskset -c 0 .venv/bin/bentoml serve service:Digits --working-dir bench/peers/digits_bentoml --port 3002
    curl -s -XPOST localhost:3002/predict -H 'content-type: application/json' -d '{"rows": [{"image": [[0,0,5,13,9,1,0,0], ...]]}]}'
"""
import os
from typing import Any

import bentoml
import torch

from mlkit.config import current_settings
from mlkit.inputs import InvalidInput
from mlkit.predictor import Predictor

S = current_settings().serve
BATCHING = os.environ.get("DIGITS_BATCHING", "true").lower() not in ("0", "false", "no")


@bentoml.service(workers=1, http={"host": "127.0.0.1"}, traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class Digits:
    def __init__(self):
        torch.set_num_threads(S.threads)  # as mlkit's service sets them
        self.predictor = Predictor.from_bundle(os.environ["DIGITS_BUNDLE"], "digits", os.environ.get("DIGITS_VERSION", "1"))

    @(bentoml.api(batchable=True, batch_dim=0, max_batch_size=S.max_batch_size, max_latency_ms=S.max_latency_ms) if BATCHING
      else bentoml.api)
    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try: return self.predictor.predict(rows, S.max_rows)
        except InvalidInput as e: raise bentoml.exceptions.InvalidArgument(str(e)) from e  # a 400 (in a batch: every request of it)
