"""The penguins classifier as a BentoML service: the model is declared here, everything else is mlkit.serving."""
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument

from mlkit import serving

EXAMPLE = [{"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
            "body_mass_g": 5000, "sex": "female"}]


@bentoml.service(name="penguins", http={"host": "127.0.0.1"}, traffic={"timeout": 30})
class Penguins:
    bento_model = bentoml.models.BentoModel(serving.bento_model_tag("penguins"))

    def __init__(self):
        self.predictor = serving.predictor_from_bento(self.bento_model)  # hash-checked: a corrupt bundle never serves
        self.log = serving.prediction_log(self.predictor)

    @bentoml.api
    def predict(self, rows: list[dict[str, Any]] = EXAMPLE, ctx: bentoml.Context = None) -> dict:
        """Score raw penguin records: one label and class probabilities per row, and the model version."""
        try:
            res = self.predictor.respond(rows)
        except serving.InvalidInput as e:
            raise InvalidArgument(str(e)) from None
        rid = serving.request_id(ctx.request.headers)
        self.log.log(rows, res, rid)
        ctx.response.headers["x-mlkit-model"] = f"{res['model']}/{res['version']}"
        ctx.response.headers["x-request-id"] = rid
        return res

    @bentoml.on_shutdown
    def close(self):
        self.log.close()  # write what is still queued


serving.guard_service(Penguins)  # API keys, body size limit, JSON-only bodies (see mlkit.serving.ServiceGuard)
