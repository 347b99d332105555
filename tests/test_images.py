"""Images end to end: the digits pipeline (8x8 grey images in scikit-learn's wheel; a real papermill run of a small CNN,
the gate, a real `bentoml serve` over HTTP) takes a pixel array, a base64 PNG and an uploaded PNG and answers the same
for the same image; bad images and tensors are 4xx naming the field, a 50 MB body a 413 before it is read; the
prediction log keeps summaries, never pixels; monitoring flags a brightened and a noisy sample, not a clean one; the
OpenAPI page documents the upload and the card shows thumbnails."""
import base64
import datetime as dt
import http.client
import io
import json
import re
import struct
import time
import urllib.request
import zlib

import numpy as np
import polars as pl
import pytest
from conftest import REPO, bento_served, mlkit, project_env, write_project

pytestmark = [pytest.mark.serve, pytest.mark.papermill]

MODEL_SETTINGS = """[monitor]
min_rows = 300
window = 1d
[model.digits]
gate.floors = test_accuracy>=0.8
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project where the digits notebook has run once with its tiny parameters (real papermill kernel)."
    root = tmp_path_factory.mktemp("digits")
    ini = write_project(root)
    ini.write_text(ini.read_text() + MODEL_SETTINGS)
    env = project_env(ini)
    r = mlkit("train", "digits", "-f", REPO / "nbs/train/digits.yaml", env=env, check=True)
    return {"root": root, "ini": ini, "env": env, "state": root / "state", "stdout": r.stdout}


@pytest.fixture
def configured(project, clean_environ):
    import os

    import mlkit.config
    os.environ.clear()
    os.environ.update(project["env"])
    return mlkit.config.configure()


@pytest.fixture(scope="module")
def served(project):
    "The digits champion (through the gate) built into a Bento and served by `bentoml serve` on 127.0.0.1."
    env = project["env"]
    r = mlkit("models", "promote", "digits", env=env, check=True)
    assert "floor test_accuracy>=0.8" in r.stdout and "loaded_back" in r.stdout, r.stdout
    bento = mlkit("build", "digits", env=env, check=True).stdout.strip().splitlines()[-1]
    with bento_served(bento, project["ini"], env, project["root"] / "serve-digits.log") as (url, port):
        yield {"url": url, "port": port}


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def png16(pixels: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str: return base64.b64encode(data).decode()


def post(url: str, body: bytes, ctype: str = "application/json", rid: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/predict", body, {"content-type": ctype, **({"x-request-id": rid} if rid else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read() or b"{}")


def post_rows(url: str, rows: list, rid: str | None = None) -> tuple[int, dict]: return post(url, json.dumps({"rows": rows}).encode(), rid=rid)


def upload(url: str, files: list[bytes], field: str = "image") -> tuple[int, dict]:
    "A multipart/form-data POST of `files`, each a part named `field`."
    bnd = "mlkit-test-boundary"
    body = b"".join(f'--{bnd}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
                    + f + b"\r\n" for i, f in enumerate(files)) + f"--{bnd}--\r\n".encode()
    return post(url, body, f"multipart/form-data; boundary={bnd}")


def png_header(w: int, h: int) -> bytes:
    "A PNG whose header claims w x h pixels (and holds none)."
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def digits():
    from mlkit.data import load_digits
    d = load_digits()
    return d["image"].to_numpy(), d["digit"].to_list()


def test_the_digits_run_records_images_and_their_preprocessing(project, configured):
    from mlkit.registry import download_bundle
    out = project["stdout"]
    acc = float(out.split("test_accuracy ", 1)[1].split(",")[0])
    assert acc >= 0.8, out  # the tiny run of a small CNN learns the digits
    path, _ = download_bundle("digits", alias="challenger")
    tensors = json.loads((path / "tensors.json").read_text())
    field = tensors["fields"][0]
    assert field["name"] == "image" and [s["op"] for s in field["steps"]] == ["scale", "normalize"], field
    assert 0.1 < field["steps"][1]["mean"][0] < 0.5 and 0.2 < field["steps"][1]["std"][0] < 0.6, field  # fitted on the training pixels
    assert json.loads((path / "model.json").read_text())["class"] == "mlkit.models.SmallCNN"
    profile = json.loads((path / "profile.json").read_text())
    assert {"image.mean.0", "image.std.0", "image.hist"} <= set(profile["columns"]) and "image" not in profile["columns"]
    assert profile["columns"]["image.hist"]["kind"] == "histogram" and len(profile["columns"]["image.hist"]["shares"]) == 16
    assert len(profile["examples"]["image"]) == 8 and profile["examples"]["image"][0].startswith("data:image/png;base64,")


def test_pixels_a_base64_png_and_an_upload_get_the_same_answer(served, digits):
    images, labels = digits
    url = served["url"]
    first = [post_rows(url, [{"image": images[i].tolist()}]) for i in range(6)]
    assert all(s == 200 for s, _ in first), first
    answers = [b["predictions"][0] for _, b in first]
    assert sum(a["label"] == labels[i] for i, a in enumerate(answers)) >= 4, (answers, labels[:6])
    for i in range(6):
        encoded = png(images[i])
        for rows in ([{"image": b64(encoded)}], [{"image": "data:image/png;base64," + b64(encoded)}]):
            s, b = post_rows(url, rows)
            assert s == 200 and b["predictions"][0] == answers[i], (s, b)
        s, b = upload(url, [encoded])
        assert s == 200 and b["predictions"][0] == answers[i], (s, b)
    # one request of many images is one forward pass of the batch: the same answers as one by one
    s, b = post_rows(url, [{"image": images[i].tolist()} for i in range(6)])
    assert s == 200 and [p["label"] for p in b["predictions"]] == [a["label"] for a in answers]
    assert np.allclose([list(p["probabilities"].values()) for p in b["predictions"]],
                       [list(a["probabilities"].values()) for a in answers], atol=1e-5)
    s, b = upload(url, [png(images[i]) for i in range(6)])  # several files under one name: several rows
    assert s == 200 and [p["label"] for p in b["predictions"]] == [a["label"] for a in answers]


def test_bad_images_and_tensors_are_4xx_naming_the_field(served, digits):
    images, _ = digits
    url, good = served["url"], png(images[0])
    cases = {
        "not an image": [{"image": b64(b"this is text, not a picture")}],
        "truncated PNG": [{"image": b64(good[: len(good) // 2])}],
        "wrong size": [{"image": b64(png(np.zeros((9, 8))))}],
        "wrong channels": [{"image": b64(png(np.zeros((8, 8, 3)), "RGB"))}],
        "100k x 100k header": [{"image": b64(png_header(100_000, 100_000))}],
        "wrong nesting": [{"image": [images[0].tolist()]}],
        "ragged": [{"image": [[0] * 8] * 7 + [[0] * 3]}],
        "not base64": [{"image": "%%%"}],
        "out of range": [{"image": (images[0].astype(int) + 300).tolist()}],
        "text in the array": [{"image": [["30"] * 8] * 8}],
        "true/false in the array": [{"image": [[True] * 8] * 8}],
        "a data: URL of text": [{"image": "data:text/plain;base64," + b64(good)}],
        "16-bit PNG": [{"image": b64(png16(np.full((8, 8), 40000, np.uint16)))}],
    }
    for what, rows in cases.items():
        s, b = post_rows(url, rows)
        assert s == 422 and b["field"] == "image" and b["detail"].startswith("rows[0].image: "), (what, s, b)
    s, b = post(url, b'{"rows": [{"image": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}]}')  # NaN: Python's JSON reads it
    assert s == 422 and b["field"] == "image" and "NaN" in b["detail"], b
    s, b = post(url, b'{"rows": [{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}]}")  # deeper than the parser goes: at once
    assert s == 400 and "too deeply" in b["detail"], b
    s, b = post_rows(url, [{"image": images[0].tolist(), "x" * 1_000_000: 1}])
    assert s == 422 and len(json.dumps(b)) < 1000, len(json.dumps(b))  # an unknown field is named, never echoed whole
    s, b = upload(url, [good], field="picture")
    assert s == 400 and "picture" in b["detail"], b
    s, b = post(url, b"plain", "text/plain")
    assert s == 415 and "multipart/form-data" in b["detail"], b
    # a 50 MB body is refused from its Content-Length, before a byte of it is read
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(50_000_000))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "exceeds the limit" in json.loads(r.read())["detail"]
    conn.close()
    s, b = post_rows(url, [{"image": images[0].tolist()}])
    assert s == 200, b  # still serving


def _logged(state, prefix: str, n: int, timeout: float = 30) -> pl.DataFrame:
    from mlkit.predlog import read_prediction_log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        df = read_prediction_log(state / "predictions" / "digits")
        if len(df) and (part := df.filter(pl.col("request_id").str.starts_with(prefix))).height >= n: return part
        time.sleep(0.3)
    raise AssertionError(f"{n} rows of {prefix}* not in the prediction log")


def test_the_log_keeps_summaries_and_monitoring_flags_bright_and_noisy_images(served, project, digits):
    images, _ = digits
    rng = np.random.default_rng(1)
    sample = images[rng.permutation(len(images))[:600]].astype(np.float64)
    forms = {"clean": sample, "bright": np.clip(np.rint(sample * 1.1), 0, 255),
             "noisy": np.clip(np.rint(sample + rng.normal(0, 0.05 * 255, sample.shape)), 0, 255)}
    verdicts = {}
    for name, imgs in forms.items():
        time.sleep(1.1)  # whole seconds apart: a window holds this sample's rows only
        since = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")
        for i in range(0, len(imgs), 50):  # half as pixels, half as base64 PNGs
            rows = [{"image": im.astype(int).tolist()} if j % 2 else {"image": b64(png(im))} for j, im in enumerate(imgs[i:i + 50])]
            s, b = post_rows(served["url"], rows, f"{name}-{i}")
            assert s == 200, b
        log = _logged(project["state"], f"{name}-", len(imgs))
        time.sleep(1.1)
        until = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")
        r = mlkit("monitor", "digits", "--since", since, "--until", until, "--json", env=project["env"])
        verdicts[name] = (r.returncode, json.loads(r.stdout))
    assert "image" not in log.columns and {"image.shape", "image.sha256", "image.mean.0", "image.std.0", "image.hist"} <= set(log.columns)
    assert set(log["image.shape"].to_list()) == {"1x8x8"} and len(log["image.hist"][0]) == 16
    for name, (_code, rep) in verdicts.items():
        assert rep["judged"] and rep["rows"] == 600, (name, rep["rows"])
    assert verdicts["clean"][0] == 0 and not verdicts["clean"][1]["alerts"], verdicts["clean"][1]["alerts"]
    for name in ("bright", "noisy"):
        code, rep = verdicts[name]
        assert code == 1 and any(a.startswith("image.") for a in rep["alerts"]), (name, rep["alerts"])
    assert any(a.startswith("image.hist") for a in verdicts["bright"][1]["alerts"]), verdicts["bright"][1]["alerts"]


def test_openapi_documents_the_image_and_the_upload(served):
    with urllib.request.urlopen(served["url"] + "/docs.json", timeout=10) as r: doc = json.loads(r.read())
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/json" in body, list(body)
    text = json.dumps(doc["components"]["schemas"]["PredictRequest"])
    assert "base64" in text.lower() and "png" in text.lower(), text[:500]


def test_the_card_shows_thumbnails(project, tmp_path):
    out = tmp_path / "card.html"
    mlkit("models", "card", "digits@champion", "-o", out, env=project["env"], check=True)
    html = out.read_text()
    assert html.count("data:image/png;base64,") >= 4, html[:300]
    assert not re.search(r'src="(https?:)?//', html), "the card loads something from outside"


def test_offline_scoring_reads_images_as_training_does(served, project, digits, tmp_path):
    "`mlkit predict` on a CSV of image file names (read as the contract says) and on a Parquet of encoded images."
    images, labels = digits
    for i in range(5): (tmp_path / f"{i}.png").write_bytes(png(images[i]))
    (tmp_path / "pics.csv").write_text("image,label\n" + "".join(f"{i}.png,{labels[i]}\n" for i in range(5)))
    mlkit("predict", "digits@champion", tmp_path / "pics.csv", tmp_path / "out.parquet", env=project["env"], check=True)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert list(map(str, out["input_label"].to_list())) == labels[:5] and out["label"].to_list() == [
        post_rows(served["url"], [{"image": images[i].tolist()}])[1]["predictions"][0]["label"] for i in range(5)]
