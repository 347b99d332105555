"""RGB JPEGs of any size into a model that wants one size: a colour classifier trained in this process on JPEGs of
varied sizes, with declared preprocessing (resize, centre crop, scale, normalize fitted on the training pixels), served
by a real `bentoml serve`; JPEGs and PNGs of sizes it never saw are resized the same way, and a batch of them scores like
the same images one by one."""
import base64
import io
import json
import os
import urllib.request

import numpy as np
import polars as pl
import pytest
from conftest import bento_served, mlkit, project_env, write_project

pytestmark = [pytest.mark.serve]

CLASSES = ["red", "green", "blue"]
COLUMN = {"dtype": "image", "size": {"min": [16, 16], "max": [64, 64]}, "channels": 3, "formats": ["jpeg", "png"],
          "preprocess": [{"op": "resize", "size": [24, 24]}, {"op": "center_crop", "size": [20, 20]},
                         {"op": "scale", "factor": 1 / 255}, {"op": "normalize"}]}


def picture(rng, cls: int, h: int, w: int, fmt: str = "JPEG") -> bytes:
    "An RGB image of h x w pixels whose dominant colour is class `cls`, noisy, encoded as `fmt`."
    from PIL import Image
    a = rng.integers(0, 90, (h, w, 3))
    a[:, :, cls] += 140
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB").save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "The colours model trained (in this process), registered, promoted, built and served on 127.0.0.1."
    from mlkit import config as mconfig
    from mlkit import models, pipeline, train
    from mlkit.contracts import Contract
    root = tmp_path_factory.mktemp("colours")
    ini = write_project(root)
    env = project_env(ini)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 150)
    frame = pl.DataFrame({"id": np.arange(150), "image": [picture(rng, int(c), *rng.integers(20, 48, 2)) for c in labels],
                          "colour": [CLASSES[c] for c in labels]}, schema_overrides={"image": pl.Binary})
    contract = Contract("colours", {"id": {"dtype": "int", "unique": True}, "image": COLUMN,
                                    "colour": {"dtype": "string", "categories": CLASSES}}, label="colour", key=["id"])
    old = dict(os.environ)
    os.environ.clear(); os.environ.update(env)
    mconfig._configured = None
    try:
        settings = mconfig.configure()
        p = pipeline.prepare("colours", "colours.parquet", contract=contract, data=frame, settings=settings)
        assert tuple(p.X_train.shape[1:]) == (3, 20, 20), p.X_train.shape  # every size resized and cropped to one
        pipeline.track(p, {"epochs": 6})
        train.seed_everything(0)
        config = models.model_config(models.SmallCNN, in_channels=3, n_classes=3, widths=[8])
        module = models.build_model(config)
        train.fit(module, p.X_train, p.y_train, p.X_val, p.y_val, epochs=6, lr=0.05, batch_size=16, progress=False)
        done = pipeline.finish(p, module, config)
        assert done.metrics["test_accuracy"] >= 0.8, done.metrics
    finally:
        os.environ.clear(); os.environ.update(old)
        mconfig._configured = None
    mlkit("models", "promote", "colours", env=env, check=True)
    bento = mlkit("build", "colours", env=env, check=True).stdout.strip().splitlines()[-1]
    with bento_served(bento, ini, env, root / "serve.log") as (url, _):
        yield url


def post_rows(url: str, rows: list) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/predict", json.dumps({"rows": rows}).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read() or b"{}")


def test_jpegs_of_other_sizes_are_resized_and_a_batch_scores_like_one_by_one(served):
    rng = np.random.default_rng(7)
    sizes, classes = [(30, 45), (50, 33), (16, 64), (64, 64), (17, 23), (40, 40)], [0, 1, 2, 0, 1, 2]
    images = [picture(rng, c, h, w, "JPEG" if i % 2 else "PNG") for i, (c, (h, w)) in enumerate(zip(classes, sizes))]
    rows = [{"image": base64.b64encode(im).decode()} for im in images]
    one = []
    for r in rows:
        s, b = post_rows(served, [r])
        assert s == 200, b
        one.append(b["predictions"][0])
    s, batch = post_rows(served, rows)
    assert s == 200, batch
    assert [p["label"] for p in batch["predictions"]] == [p["label"] for p in one]
    probs = lambda ps: np.array([[p["probabilities"][c] for c in CLASSES] for p in ps])
    assert np.allclose(probs(batch["predictions"]), probs(one), atol=1e-5), (probs(batch["predictions"]), probs(one))
    assert sum(p["label"] == CLASSES[c] for p, c in zip(one, classes)) >= 5, one  # the colours, whatever the size
    s, b = post_rows(served, [{"image": base64.b64encode(picture(rng, 0, 80, 20)).decode()}])
    assert s == 422 and b["field"] == "image" and "expected between 16x16 and 64x64" in b["detail"], b
    s, b = post_rows(served, [{"image": base64.b64encode(picture(rng, 0, 20, 20, "GIF")).decode()}])
    assert s == 422 and b["field"] == "image" and "JPEG or PNG" in b["detail"], b
