"""The idiomatic BentoML service of the registered penguins model: what a BentoML user would write instead of mlkit.

Written from BentoML's docs: "Create online API Services" (https://docs.bentoml.com/en/latest/build-with-bentoml/services.html:
a `@bentoml.service` class that loads its model once in `__init__`, one `@bentoml.api` method) and "Adaptive batching"
(https://docs.bentoml.com/en/latest/guides/adaptive-batching.html: `@bentoml.api(batchable=True, batch_dim=0,
max_batch_size=..., max_latency_ms=...)`, the method taking and returning a list that BentoML merges across requests
and splits back). It loads the SAME bundle mlkit serves (a folder from `mlkit.registry.download_bundle`) with mlkit's
`Predictor` (record check, transform, forward pass, answers as dicts), with mlkit's `[serve]` limits (max_batch_size,
max_latency_ms, threads), 1 worker, access log off (mlkit's default); BentoML's JSON IO and metrics as they come.
torch and the model code are imported at the top, as BentoML's examples do; `PENGUINS_IMPORT_IN_INIT=1` imports them in
`__init__` instead, so `bentoml serve`'s arbiter (which imports this file only to read the service) does not (the
benchmark's cold start reports both).

Run it alone (the body is the same as mlkit's: `{"rows": [...]}`; it answers a list of `{label, probabilities}`):

    cd bench/peers/penguins_bentoml && PENGUINS_BUNDLE=/path/to/bundle taskset -c 0 ../../../.venv/bin/bentoml serve . --host 127.0.0.1 --port 3002
    curl -s -XPOST localhost:3002/predict -H 'content-type: application/json' -d '{"rows": [{"island": "Biscoe",
        "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}]}'
"""
import os
from typing import Any

import bentoml

from mlkit.config import current_settings
from mlkit.inputs import InvalidInput

if os.environ.get("PENGUINS_IMPORT_IN_INIT") != "1":
    import torch  # noqa: F401  (loaded here: the arbiter pays for it too, as a top-level import does)
    from mlkit.predictor import Predictor  # noqa: F401

S = current_settings().serve


@bentoml.service(workers=1, http={"host": "127.0.0.1"}, traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class Penguins:
    def __init__(self):
        import torch  # already imported, unless PENGUINS_IMPORT_IN_INIT=1
        from mlkit.predictor import Predictor
        torch.set_num_threads(S.threads)  # as mlkit's service sets them
        self.predictor = Predictor.from_bundle(os.environ["PENGUINS_BUNDLE"], "penguins", os.environ.get("PENGUINS_VERSION", "1"))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=S.max_batch_size, max_latency_ms=S.max_latency_ms)
    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try: return self.predictor.predict(rows, S.max_rows)
        except InvalidInput as e: raise bentoml.exceptions.InvalidArgument(str(e)) from e  # a 400 (in a batch: every request of it)
