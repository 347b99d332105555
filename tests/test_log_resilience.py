"""The prediction log cannot be silenced (issue 18, first part): a lone surrogate is answered 200 and logged with its
text replaced and flagged; when the log's folder cannot be written, rows are held and retried, past the queue bound the
service answers 503 and /readyz says why, and once writing works again the answers resume and every answered row is in
the log exactly once. And auth fails closed: a key source that is set but holds no key stops `mlkit serve` at start."""
import json
import shutil
import time
import urllib.request

import polars as pl
import pytest
from conftest import bento_served, champion_bento, mlkit

pytestmark = pytest.mark.serve

ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215, "body_mass_g": 5000, "sex": "female"}


def post(url: str, body: bytes, rid: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/predict", body, {"content-type": "application/json", "x-request-id": rid})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read() or b"{}")


def ids(folder) -> list:
    from mlkit.predlog import read_prediction_log
    log = read_prediction_log(folder) if folder.is_dir() else pl.DataFrame()
    return log["request_id"].to_list() if "request_id" in log.columns else []


def readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r: return r.status, r.read().decode()
    except urllib.error.HTTPError as e: return e.code, e.read().decode()


def test_the_log_survives_bad_text_and_an_unwritable_folder(trained, tmp_path):
    from mlkit.predlog import read_prediction_log
    env = trained["env"]
    bento = champion_bento(env)
    folder = trained["state"] / "predictions" / "penguins"
    answered = []
    with bento_served(bento, trained["ini"], env, tmp_path / "serve.log", {"MLKIT_SERVE__LOG_QUEUE_ROWS": "5"}) as (url, _):
        s, b = post(url, b'{"rows": [{"island": "Bis\\ud800coe", "bill_length_mm": 45.1, "sex": "female", "bill_depth_mm": 14.5, '
                         b'"flipper_length_mm": 215, "body_mass_g": 5000}]}', "surrogate")
        assert s == 200, b
        answered.append("surrogate")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "surrogate" not in ids(folder): time.sleep(0.3)
        row = read_prediction_log(folder).filter(pl.col("request_id") == "surrogate")
        assert row["island"].to_list() == ["Bis\ufffdcoe"] and row["replaced_text"].to_list() == [True], row
        # the log's folder becomes a file: every write fails; rows are held, then the service refuses (503) and is not ready
        shutil.move(folder, folder.with_name("penguins.moved"))
        folder.write_text("")
        statuses = []
        for i in range(40):
            s, b = post(url, json.dumps({"rows": [ROW]}).encode(), f"held-{i}")
            statuses.append(s)
            if s == 200: answered.append(f"held-{i}")
            if s == 503: break
            time.sleep(0.2)
        assert statuses[-1] == 503 and "prediction log" in b["detail"] and statuses.count(200) >= 5, (statuses, b)
        code, text = readyz(url)
        assert code == 503 and "cannot write" in text, (code, text)
        # room again: writing resumes by itself, and so do the answers
        folder.unlink()
        shutil.move(folder.with_name("penguins.moved"), folder)
        t0, s = time.monotonic(), 0
        while time.monotonic() - t0 < 15:
            s, b = post(url, json.dumps({"rows": [ROW]}).encode(), f"after-{len(answered)}")
            if s == 200: answered.append(f"after-{len(answered)}"); break
            time.sleep(0.3)
        assert s == 200 and time.monotonic() - t0 < 10, (s, b)
        assert readyz(url)[0] == 200
    logged = ids(folder)
    assert all(logged.count(r) == 1 for r in answered), [r for r in answered if logged.count(r) != 1]


def test_a_key_source_set_to_nothing_stops_the_service_at_start(trained, tmp_path):
    for blank in (",", " "):
        r = mlkit("serve", "penguins", "--port", "1", env={**trained["env"], "MLKIT_API_KEYS": blank}, timeout=60)
        assert r.returncode == 2 and "MLKIT_API_KEYS is set but holds no key" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ini = tmp_path / "settings.ini"
    ini.write_text(trained["ini"].read_text().replace("state_dir = state", f"state_dir = {trained['state']}")
                   + "[serve]\napi_key_hashes_file = missing.sha256\n")
    r = mlkit("serve", "penguins", "--port", "1", env={**trained["env"], "MLKIT_SETTINGS": str(ini)}, timeout=60)
    assert r.returncode == 2 and "api_key_hashes_file: cannot read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = mlkit("serve", "penguins", "--host", "0.0.0.0", "--port", "1", env={**trained["env"], "MLKIT_API_KEYS": ","}, timeout=60)
    assert r.returncode == 2 and "holds no key" in r.stderr, r.stderr  # never a public service without a real key
