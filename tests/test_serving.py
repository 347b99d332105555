"""A real `bentoml serve` of the Bento built from the registry, called over HTTP on 127.0.0.1."""
import json
import re
import urllib.request

import pytest
from conftest import mlkit

pytestmark = pytest.mark.serve

KEY, OTHER_KEY = "test-key-0123456789", "another-key-abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
       "body_mass_g": 5000, "sex": "female"}


@pytest.fixture(scope="module")
def service(trained):
    from mlkit.demo import post_json
    from mlkit.config import load_settings
    from mlkit.deploy import free_port, start_service, stop_service, wait_ready
    mlkit("models", "promote", "penguins", env=trained["env"], check=True)
    bento = mlkit("build", "penguins", env=trained["env"], check=True).stdout.strip().splitlines()[-1]
    settings = load_settings(trained["ini"], env={})
    port = free_port()
    log = trained["root"] / "serve.log"
    import os
    old = dict(os.environ)
    os.environ.update(trained["env"])
    try:
        proc = start_service(bento, port=port, settings=settings, log=log, extra_env={"MLKIT_API_KEYS": f"{OTHER_KEY},{KEY}"})
    finally:
        os.environ.clear(); os.environ.update(old)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        yield {"url": url, "bento": bento, "post": lambda body: post_json(f"{url}/predict", body, AUTH), "log": log, "proc": proc}
    finally:
        stop_service(proc)


def test_bento_is_recorded_on_the_registered_version(service, trained, in_project):
    from mlkit.registry import get_version
    mv = get_version("penguins", alias="champion")
    assert mv.tags["mlkit.bento"] == service["bento"]


def test_predict_returns_label_probabilities_and_version(service, in_project):
    from mlkit.registry import download_bundle
    from mlkit.predictor import Predictor
    status, body, headers = service["post"]({"rows": [ROW, {**ROW, "sex": None, "island": "Dream"}]})
    assert status == 200, body
    assert body["model"] == "penguins" and body["version"] == "1"
    assert headers["x-mlkit-model"] == "penguins/1"
    assert len(body["predictions"]) == 2
    path, _ = download_bundle("penguins", alias="champion")
    local = Predictor.from_bundle(path).predict([ROW])[0]
    served = body["predictions"][0]
    assert served["label"] == local["label"]
    for k, v in local["probabilities"].items(): assert abs(served["probabilities"][k] - v) < 1e-6


@pytest.mark.parametrize("body,field,needle", [
    ({"rows": [{**ROW, "bill_length_mm": "long"}]}, "bill_length_mm", "rows[0].bill_length_mm: expected a number"),
    ({"rows": [ROW, {k: v for k, v in ROW.items() if k != "island"}]}, "island", "rows[1].island: required"),
    ({"rows": [{**ROW, "wingspan": 3}]}, "wingspan", "rows[0].wingspan: unknown field"),
    ({"rows": []}, "rows", "non-empty"),
    ({"rows": [{**ROW, "body_mass_g": 10**400}]}, "body_mass_g", "within +-1e300"),  # was a 500 (OverflowError)
])
def test_bad_input_is_a_422_naming_the_field(service, body, field, needle):
    status, out, headers = service["post"](body)
    assert status == 422, (status, out)
    assert out["error"] == "invalid_input" and out["field"] == field and needle in out["detail"], out
    assert headers["x-request-id"]


def test_infinity_and_malformed_bodies_are_4xx(service):
    raw = lambda b: _raw(service["url"], "/predict", b, {"Content-Type": "application/json", **AUTH})
    status, body = raw(b'{"rows": [{"island": "Biscoe", "bill_length_mm": 1e999}]}')  # parses as infinity
    assert status == 422 and "must be finite" in json.loads(body)["detail"]
    status, body = raw(b'{"rows": [{"island": "Biscoe", "bill_length_mm": NaN}]}')
    assert 400 <= status < 500, body
    for bad in (b"{bad", b"[]", b'{"rows": [1]}', b"{}"):
        status, body = raw(bad)
        assert status == 400 and "error" in json.loads(body), (bad, body)


def test_openapi_page_documents_the_contract(service):
    with urllib.request.urlopen(service["url"] + "/docs.json", timeout=10) as r: doc = json.loads(r.read())
    op = doc["paths"]["/predict"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PredictRequest"}
    req = doc["components"]["schemas"]["PredictRequest"]
    row = req["properties"]["rows"]["items"]
    assert set(row["properties"]) == set(ROW) and row["additionalProperties"] is False
    assert row["properties"]["bill_length_mm"]["type"] == "number" and row["properties"]["island"]["type"] == "string"
    assert row["required"] == ["island"] and req["properties"]["rows"]["maxItems"] == 1000
    assert set(req["example"]["rows"][0]) == set(ROW)
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(op["responses"])
    assert op["security"] == [{"bearer": []}] and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    status, _, _ = service["post"](req["example"])  # the documented example is a valid request
    assert status == 200


def test_schemathesis_finds_no_failures(service, tmp_path):
    "Property-based tests generated from /docs.json, every check on, with a valid token: zero failures."
    import subprocess
    import sys
    from pathlib import Path
    st = Path(sys.executable).parent / "st"
    # a schema-violating body may also be over the body limit (a string past maxLength, 1 MB of it): a 413 rejects it too
    (tmp_path / "schemathesis.toml").write_text('[checks.negative_data_rejection]\nexpected-statuses = '
                                                '["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]\n')
    r = subprocess.run([str(st), "run", service["url"] + "/docs.json", "-H", f"Authorization: Bearer {KEY}", "--checks", "all",
                        "--max-examples", "300", "-w", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and "No issues found" in r.stdout, r.stdout[-6000:]


def test_request_log_is_json_with_the_request_id(service):
    rid = "json-log-check-42"
    status, _ = _raw(service["url"], "/predict", json.dumps({"rows": [{**ROW, "sex": 3}]}).encode(),
                     {"Content-Type": "application/json", "x-request-id": rid, **AUTH})
    assert status == 422
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(ln) for ln in service["log"].read_text().splitlines() if ln.startswith("{") and rid in ln]
        if lines: break
        time.sleep(0.2)
    assert lines, "no JSON log line with the request id"
    assert lines[0]["logger"] == "mlkit.requests" and lines[0]["status"] == 422 and lines[0]["field"] == "sex"
    assert lines[0]["version"] == "1" and "Biscoe" not in json.dumps(lines[0])  # no raw feature values in logs


def test_non_loopback_host_refused_without_keys(trained):
    r = mlkit("serve", "penguins", "--host", "0.0.0.0", env=trained["env"])
    assert r.returncode == 2 and "refusing to serve on 0.0.0.0" in r.stderr


def _raw(url, path, body: bytes, headers: dict, method="POST"):
    req = urllib.request.Request(url + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"}])
def test_api_routes_need_a_key(service, headers):
    status, body = _raw(service["url"], "/predict", json.dumps({"rows": [ROW]}).encode(), {"Content-Type": "application/json", **headers})
    assert status == 401 and json.loads(body)["error"] == "unauthorized"


def test_probes_metrics_and_docs_stay_open(service):
    for path in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json"):
        with urllib.request.urlopen(service["url"] + path, timeout=5) as r: assert r.status == 200, path


def test_both_configured_keys_work_and_bentoml_client_sends_the_token(service):
    status, _ = _raw(service["url"], "/predict", json.dumps({"rows": [ROW]}).encode(),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {OTHER_KEY}"})
    assert status == 200
    import bentoml
    with bentoml.SyncHTTPClient(service["url"], token=KEY) as client:
        out = client.predict(rows=[ROW])
    assert out["model"] == "penguins" and len(out["predictions"]) == 1


def _partial_post(url: str, length: int, first: bytes, headers: dict) -> tuple[int, dict]:
    "POST announcing `length` body bytes but sending only `first`; the status and JSON body of the answer."
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{u.hostname}:{u.port}", "Content-Length": length, **headers}.items())
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\n{head}\r\n".encode() + first)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(re.search(rb"(?i)content-length: (\d+)", data).group(1)):
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_oversized_body_is_413_before_reading(service):
    "A body announced over the limit is refused at its headers: the 413 arrives while most of the body was never sent."
    big = 12_000 * len(json.dumps(ROW))  # > 1 MiB
    assert big > 1_048_576
    h = {"Content-Type": "application/json", **AUTH}
    status, body = _partial_post(service["url"], big, b"", {**h, "Expect": "100-continue"})  # as curl sends large bodies
    assert status == 413 and "exceeds the limit" in body["detail"] and body["error"] == "payload_too_large"
    status, body = _partial_post(service["url"], big, b'{"rows": [' + b" " * 65536, h)  # a client that does not wait
    assert status == 413 and "exceeds the limit" in body["detail"]


def test_oversized_chunked_body_is_413(service):
    import http.client
    from urllib.parse import urlparse
    u = urlparse(service["url"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    chunks = (b"x" * 65536 for _ in range(20))
    try: conn.request("POST", "/predict", body=chunks, headers={"Content-Type": "application/json", **AUTH}, encode_chunked=True)
    except (BrokenPipeError, ConnectionResetError): pass  # it answered and closed before the last chunk went: read its answer
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"] == "payload_too_large"


@pytest.mark.parametrize("ctype", ["application/python-pickle", "application/octet-stream", "text/plain"])
def test_non_json_bodies_are_415(service, ctype):
    status, body = _raw(service["url"], "/predict", b"\x80\x04\x95", {"Content-Type": ctype, **AUTH})
    assert status == 415 and ctype in json.loads(body)["detail"]


def test_too_many_rows_is_a_4xx_naming_rows(service):
    status, out, _ = service["post"]({"rows": [ROW] * 1001})
    assert 400 <= status < 500 and "at most 1000" in json.dumps(out)


def test_every_served_row_reaches_the_prediction_log(service, trained):
    from mlkit.predlog import read_prediction_log
    rid = "log-check-123"
    rows = [ROW, {**ROW, "island": "Dream", "sex": None}, {**ROW, "body_mass_g": 3000}]
    status, body = _raw(service["url"], "/predict", json.dumps({"rows": rows}).encode(),
                        {"Content-Type": "application/json", "x-request-id": rid, **AUTH})
    assert status == 200
    folder = trained["state"] / "predictions" / "penguins"
    import time
    deadline, logged = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        df = read_prediction_log(folder) if folder.exists() else None
        if df is not None and len(df) and (df["request_id"] == rid).sum() == 3:
            logged = df.filter(df["request_id"] == rid).sort("row")
            break
        time.sleep(0.5)
    assert logged is not None, "rows not in the prediction log"
    served = json.loads(body)["predictions"]
    assert logged["prediction"].to_list() == [p["label"] for p in served]
    assert logged["island"].to_list() == ["Biscoe", "Dream", "Biscoe"] and logged["version"].to_list() == ["1"] * 3
    assert logged["answered_by"].to_list() == ["champion"] * 3


def test_offline_predict_matches_the_service(service, trained, tmp_path):
    from mlkit.data import load_penguins
    src = tmp_path / "in.parquet"
    load_penguins().drop("species").write_parquet(src)
    out = tmp_path / "out.parquet"
    r = mlkit("predict", "penguins@champion", src, out, "--batch-rows", "100", env=trained["env"], check=True)
    assert "344 rows scored by penguins version 1" in r.stdout
    import polars as pl
    scored = pl.read_parquet(out)
    assert scored.height == 344 and {"label", "p_Adelie", "model_version"} <= set(scored.columns)
    status, body, _ = service["post"]({"rows": [ROW]})
    one = pl.DataFrame([ROW]).with_columns(pl.col("flipper_length_mm").cast(pl.Int64))
    one.write_parquet(tmp_path / "one.parquet")
    mlkit("predict", "penguins@champion", tmp_path / "one.parquet", tmp_path / "one_out.parquet", env=trained["env"], check=True)
    p = pl.read_parquet(tmp_path / "one_out.parquet").row(0, named=True)
    assert p["label"] == body["predictions"][0]["label"]
    assert abs(p["p_Gentoo"] - body["predictions"][0]["probabilities"]["Gentoo"]) < 1e-6


def _metrics(url) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r: return r.read().decode()


def _sample(text: str, name: str, **labels) -> float:
    "Sum of the Prometheus samples `name` whose labels include `labels`."
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"): continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()): total += float(value)
    return total


def test_bento_is_self_contained(service, trained):
    "The Bento carries the packed model tags, a wheel of this checkout's mlkit and the commit; no MLflow at serving."
    import subprocess

    import yaml
    home = trained["state"] / "bentoml" / "bentos" / "penguins"
    bento_dir = home / service["bento"].split(":")[1]
    models = json.loads((bento_dir / "src" / "mlkit-models.json").read_text())
    assert set(models) == {"champion"} and models["champion"].startswith("penguins:v1-")
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for m in info["services"][0]["models"]] == [models["champion"]]  # containerize copies it into the image
    wheels = list((bento_dir / "env" / "python" / "wheels").glob("mlkit-*.whl"))
    assert len(wheels) == 1
    import mlkit as pkg
    from pathlib import Path
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(pkg.__file__).parent).stdout.strip()
    assert info["labels"]["mlkit_commit"].split("-")[0] == head
    assert info["labels"]["champion_model"] == models["champion"].replace(":", "_")
    assert "mlflow" not in (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "WHEELS_DIR" in (bento_dir / "env" / "python" / "install.sh").read_text()  # the image installs the packed wheel


def test_metrics_are_labelled_with_the_model_version(service):
    before = _metrics(service["url"])
    status, body, _ = service["post"]({"rows": [ROW, ROW]})
    assert status == 200
    assert service["post"]({"rows": [{**ROW, "bill_length_mm": "x"}]})[0] == 422
    after = _metrics(service["url"])
    lab = {"model": "penguins", "version": "1", "answered_by": "champion"}
    assert _sample(after, "mlkit_requests_total", status="ok", **lab) - _sample(before, "mlkit_requests_total", status="ok", **lab) >= 1
    assert _sample(after, "mlkit_requests_total", status="invalid", **lab) >= 1
    label = body["predictions"][0]["label"]
    assert _sample(after, "mlkit_predicted_class_total", label=label, **lab) - _sample(before, "mlkit_predicted_class_total", label=label, **lab) >= 2
    assert _sample(after, "mlkit_request_seconds_count", **lab) >= 1
    assert _sample(after, "mlkit_batch_rows_count", model="penguins", version="1") >= 1


def test_concurrent_requests_share_forward_passes(service):
    "Adaptive batching: 240 concurrent one-row requests take fewer forward passes than requests, and all succeed."
    from concurrent.futures import ThreadPoolExecutor
    before = _metrics(service["url"])
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda i: service["post"]({"rows": [{**ROW, "body_mass_g": 3000 + i}]})[0], range(240)))
    assert statuses == [200] * 240
    after = _metrics(service["url"])
    passes = _sample(after, "mlkit_batch_rows_count", model="penguins", version="1") - _sample(before, "mlkit_batch_rows_count", model="penguins", version="1")
    rows = _sample(after, "mlkit_batch_rows_sum", model="penguins", version="1") - _sample(before, "mlkit_batch_rows_sum", model="penguins", version="1")
    assert rows == 240 and passes < 240, (passes, rows)


def test_response_says_which_model_answered(service):
    status, body, headers = service["post"]({"rows": [ROW]})
    assert status == 200 and body["answered_by"] == "champion" and headers["x-mlkit-answered-by"] == "champion"


def test_monitor_flags_the_drift_of_served_traffic(service, trained, tmp_path):
    "The test traffic repeats a few rows: far from the training data, so `mlkit monitor` reports drift and exits 1."
    rid = "monitor-labels-1"
    status, _ = _raw(service["url"], "/predict", json.dumps({"rows": [ROW, ROW]}).encode(),
                     {"Content-Type": "application/json", "x-request-id": rid, **AUTH})
    assert status == 200
    import time

    from mlkit.predlog import read_prediction_log
    folder = trained["state"] / "predictions" / "penguins"
    deadline = time.monotonic() + 30
    logged = lambda: (df := read_prediction_log(folder)).height and (df["request_id"] == rid).sum()
    while time.monotonic() < deadline and logged() < 2: time.sleep(0.5)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"request_id,row,label\n{rid},0,Gentoo\n{rid},1,Adelie\n")
    out = tmp_path / "report.json"
    r = mlkit("monitor", "penguins", "--json", "--labels", labels, "-o", out, "--log", env=trained["env"])
    assert r.returncode == 1, r.stderr
    rep = json.loads(out.read_text())
    assert rep["alert"] and rep["version"] == "1" and rep["rows"] >= 500
    psi = {d["column"]: d["psi"] for d in rep["columns"]}
    assert set(psi) == set(ROW) and psi["bill_length_mm"] > 0.1
    assert any(a.startswith("bill_length_mm: PSI") for a in rep["alerts"])
    assert rep["performance"]["labelled_rows"] == 2 and rep["performance"]["accuracy"] in (0.0, 0.5, 1.0)
    r = mlkit("monitor", "penguins", "--since", "2999-01-01", env=trained["env"])
    assert r.returncode == 2 and "no logged predictions" in r.stderr


def test_model_card_is_one_self_contained_page(service, trained, tmp_path):
    "`mlkit models card penguins@champion`: every section, the contract's slices, the gate, no script or external URL."
    out = tmp_path / "card.html"
    r = mlkit("models", "card", "penguins@champion", "-o", out, env=trained["env"], check=True)
    assert "model card of penguins version 1" in r.stdout
    page = out.read_text()
    for section in ("purpose", "data", "metrics", "slices", "gate", "lineage", "history", "monitoring", "training"):
        assert f'<h2 id="{section}">' in page, section
    assert "<h3>island</h3>" in page and "beats_champion" in page and "test_accuracy" in page
    assert "<script" not in page and not re.findall(r'(?:src|href)="(?:https?:)?//', page)
    assert "epochs" in page and "sha256:" in page  # parameters, dataset version
    assert "Latest monitoring run" in page and "ALERT" in page  # the verdict `mlkit monitor --log` recorded


def test_bulk_request_is_scored_alone_counted_and_logged(service, trained, in_project):
    "A 100-row request (scored inline, in one pass of its own): the same answers as the Predictor, counted, every row logged."
    import time
    from mlkit.predictor import Predictor
    from mlkit.predlog import read_prediction_log
    from mlkit.registry import download_bundle
    rid, rows = "bulk-check-100", [{**ROW, "body_mass_g": 3000 + 20 * i, "sex": None if i % 7 == 0 else "male"} for i in range(100)]
    before = _metrics(service["url"])
    status, body = _raw(service["url"], "/predict", json.dumps({"rows": rows}).encode(),
                        {"Content-Type": "application/json", "x-request-id": rid, **AUTH})
    assert status == 200, body
    after = _metrics(service["url"])
    served = json.loads(body)["predictions"]
    local = Predictor.from_bundle(download_bundle("penguins", alias="champion")[0]).predict(rows)
    assert [p["label"] for p in served] == [p["label"] for p in local]
    assert max(abs(s["probabilities"][k] - v) for s, p in zip(served, local) for k, v in p["probabilities"].items()) < 1e-6
    delta = lambda name: _sample(after, name, model="penguins", version="1") - _sample(before, name, model="penguins", version="1")
    assert (delta("mlkit_batch_rows_count"), delta("mlkit_batch_rows_sum")) == (1, 100)
    folder, deadline, logged = trained["state"] / "predictions" / "penguins", time.monotonic() + 30, None
    while time.monotonic() < deadline and logged is None:
        df = read_prediction_log(folder) if folder.exists() else None
        if df is not None and len(df) and (df["request_id"] == rid).sum() == 100: logged = df.filter(df["request_id"] == rid).sort("row")
        else: time.sleep(0.5)
    assert logged is not None, "the request's 100 rows did not all reach the prediction log"
    assert logged["row"].to_list() == list(range(100)) and logged["prediction"].to_list() == [p["label"] for p in served]
    assert logged["body_mass_g"].to_list() == [float(r["body_mass_g"]) for r in rows] and logged["sex"].null_count() == 15
