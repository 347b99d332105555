"""The diabetes regressor as a BentoML service: the models are declared here, everything else is mlkit."""
from pathlib import Path
from typing import Any

import bentoml

from mlkit import bento, service

MODELS = bento.bento_models("diabetes", Path(__file__).parent)  # what `mlkit build` packed: champion (+ challenger)


@bentoml.service(name="diabetes", **service.service_config())  # 127.0.0.1, workers, access log, tracing: [serve]
class Diabetes:
    champion = bentoml.models.BentoModel(MODELS["champion"])
    if "challenger" in MODELS:  # `mlkit build diabetes --with-challenger`: canary and shadow
        challenger = bentoml.models.BentoModel(MODELS["challenger"])

    def __init__(self):
        self.server = service.model_server(self)  # bundles hash-checked: a corrupt one never serves, /readyz stays 503

    @bentoml.api
    async def predict(self, rows: list[dict[str, Any]], ctx: bentoml.Context) -> dict:
        """Predict the disease's progression a year on: one `{value}` per row (in the score's units), and the model
        version that answered. A row the contract rejects is a 422 naming the row and field; an overloaded server a 503."""
        return await self.server.handle(rows, ctx)  # a finished JSON response (see ModelServer.handle)

    @bentoml.on_shutdown
    async def close(self):
        await self.server.aclose()  # shadow scoring in flight, then every queued prediction-log row


# API keys, body size limit, JSON-only bodies, and /docs.json written from the champion's contract (mlkit.guard)
service.guard_service(Diabetes, models=MODELS)
