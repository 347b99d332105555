"""The penguins classifier as a BentoML service: the models are declared here, everything else is mlkit.serving."""
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument, ServiceUnavailable

from mlkit import serving

EXAMPLE = [{"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
            "body_mass_g": 5000, "sex": "female"}]
MODELS = serving.bento_models("penguins", Path(__file__).parent)  # what `mlkit build` packed: champion (+ challenger)


@bentoml.service(name="penguins", http={"host": "127.0.0.1"}, traffic={"timeout": 30})
class Penguins:
    champion = bentoml.models.BentoModel(MODELS["champion"])
    if "challenger" in MODELS:  # `mlkit build penguins --with-challenger`: canary and shadow
        challenger = bentoml.models.BentoModel(MODELS["challenger"])

    def __init__(self):
        self.server = serving.model_server(self)  # bundles hash-checked: a corrupt one never serves, /readyz stays 503

    @bentoml.api
    async def predict(self, rows: list[dict[str, Any]] = EXAMPLE, ctx: bentoml.Context = None) -> dict:
        """Score raw penguin records: one label and class probabilities per row, and the model version that answered."""
        rid = serving.request_id(ctx.request.headers)
        ctx.response.headers["x-request-id"] = rid
        try:
            res = await self.server.respond(rows, rid)
        except serving.InvalidInput as e:
            raise InvalidArgument(str(e)) from None
        except serving.Overloaded as e:
            raise ServiceUnavailable(str(e)) from None
        ctx.response.headers["x-mlkit-model"] = f"{res['model']}/{res['version']}"
        ctx.response.headers["x-mlkit-answered-by"] = res["answered_by"]
        return res

    @bentoml.on_shutdown
    async def close(self):
        await self.server.aclose()  # shadow scoring in flight, then every queued prediction-log row


serving.guard_service(Penguins)  # API keys, body size limit, JSON-only bodies (see mlkit.serving.ServiceGuard)
