"""Canary and shadow over HTTP: a Bento built `--with-challenger` from two registered versions, served by `bentoml serve`."""
import json
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.serve

ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
       "body_mass_g": 5000, "sex": "female"}


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    from mlkit.config import load_settings
    from mlkit.deploy import free_port, start_service, stop_service, wait_ready
    root = tmp_path_factory.mktemp("canary")
    ini = write_project(root)
    env = project_env(ini)
    params = REPO / "nbs/train/penguins.yaml"
    mlkit("train", "penguins", "-f", params, env=env, check=True)
    mlkit("models", "promote", "penguins", env=env, check=True)  # version 1: champion
    mlkit("train", "penguins", "-f", params, "-p", "seed=1", env=env, check=True)  # version 2: challenger
    bento = mlkit("build", "penguins", "--with-challenger", env=env, check=True).stdout.strip().splitlines()[-1]
    port = free_port()
    serve_env = {**env, "MLKIT_SERVE__CANARY_SHARE": "0.5", "MLKIT_SERVE__SHADOW": "true"}
    import os
    old = dict(os.environ)
    os.environ.clear(); os.environ.update(serve_env)
    try: proc = start_service(bento, port=port, settings=load_settings(ini, env=serve_env), log=root / "serve.log")
    finally: os.environ.clear(); os.environ.update(old)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        yield {"url": url, "root": root, "env": env, "bento": bento, "proc": proc}
    finally:
        stop_service(proc)


def _post(url, rows, rid):
    req = urllib.request.Request(url + "/predict", json.dumps({"rows": rows}).encode(),
                                 {"Content-Type": "application/json", "x-request-id": rid})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read()), dict(r.headers)


def test_canary_share_and_shadow_are_served_and_logged(canary):
    from mlkit.predlog import read_prediction_log
    answers = {}
    for i in range(40):
        body, headers = _post(canary["url"], [ROW, {**ROW, "body_mass_g": 3000 + i}], f"req-{i}")
        assert body["answered_by"] == headers["x-mlkit-answered-by"]
        assert (body["answered_by"], body["version"]) in {("champion", "1"), ("challenger", "2")}, body
        assert headers["x-mlkit-model"] == f"penguins/{body['version']}"
        answers[f"req-{i}"] = body["answered_by"]
    assert set(answers.values()) == {"champion", "challenger"}  # a 0.5 share: all 40 the same has odds 2 in 10^12
    champion_reqs = {r for r, who in answers.items() if who == "champion"}
    folder = canary["root"] / "state" / "predictions" / "penguins"
    deadline, log = time.monotonic() + 30, None
    while time.monotonic() < deadline:  # the log writer flushes every 2 s
        log = read_prediction_log(folder) if folder.exists() else None
        if log is not None and len(log) >= 2 * (40 + len(champion_reqs)): break
        time.sleep(0.5)
    assert log is not None and len(log) == 2 * (40 + len(champion_reqs)), None if log is None else len(log)
    by = {who: set(log.filter(log["answered_by"] == who)["request_id"]) for who in ("champion", "challenger", "shadow")}
    assert by["champion"] == champion_reqs and by["challenger"] == set(answers) - champion_reqs
    assert by["shadow"] == champion_reqs  # the challenger scored every request the champion answered
    assert set(log.filter(log["answered_by"] == "shadow")["version"]) == {"2"}


def test_both_versions_carry_the_bento_tag(canary):
    import os
    old = dict(os.environ)
    os.environ.clear(); os.environ.update(canary["env"])
    try:
        import mlkit.config
        mlkit.config.configure()
        from mlkit.registry import get_version
        assert get_version("penguins", alias="champion").tags["mlkit.bento"] == canary["bento"]
        assert get_version("penguins", alias="challenger").tags["mlkit.bento"] == canary["bento"]
    finally:
        os.environ.clear(); os.environ.update(old)


def test_shadow_metrics_by_version(canary):
    with urllib.request.urlopen(canary["url"] + "/metrics", timeout=10) as r: text = r.read().decode()
    assert 'answered_by="shadow"' in text and 'version="2"' in text and 'version="1"' in text


def test_deploy_switches_versions_with_no_failed_request(canary):
    "`mlkit deploy` under light load: version 1 serves, version 2 is promoted and deployed, no request fails in between."
    from mlkit.deploy import free_port
    env, port = canary["env"], free_port()
    try: _deploy_under_load(canary, env, port)
    finally: mlkit("deploy", "penguins", "--stop", env=env)  # never leave a service behind, even when an assert failed
    with pytest.raises(OSError): urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)


def _deploy_under_load(canary, env, port):
    import threading
    out = mlkit("deploy", "penguins", "--port", port, env=env, check=True).stdout
    assert "penguins version 1" in out and f"127.0.0.1:{port}" in out
    first_pid = json.loads((canary["root"] / "state" / "deployments" / "penguins.json").read_text())["pid"]
    url, results, stop = f"http://127.0.0.1:{port}", [], threading.Event()

    def load():  # a fresh connection per request, ~30-50 requests a second
        while not stop.is_set():
            req = urllib.request.Request(url + "/predict", json.dumps({"rows": [ROW]}).encode(),
                                         {"Content-Type": "application/json", "Connection": "close"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r: results.append((r.status, json.loads(r.read())["version"]))
            except Exception as e: results.append((type(e).__name__, str(e)))
            time.sleep(0.02)
    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(1)
        mlkit("models", "promote", "penguins", "2", "--force", "--reason", "deploy test", env=env, check=True)
        out = mlkit("deploy", "penguins", "--port", port, env=env, check=True).stdout
        assert "penguins version 2" in out and "replaced version 1" in out
        time.sleep(1)
    finally:
        stop.set(); t.join()
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v in results]
    assert "1" in versions and versions[-10:] == ["2"] * 10, versions[-20:]
    from mlkit.deploy import _alive
    assert not _alive(first_pid), "the previous service still runs"
    assert "already serves" in mlkit("deploy", "penguins", "--port", port, env=env, check=True).stdout
    hist = json.loads(mlkit("models", "history", "penguins", "--json", env=env, check=True).stdout)
    deploys = [(r["from_version"], r["to_version"]) for r in hist if r["action"] == "deploy"]
    assert deploys == [(None, "1"), ("1", "2")]
    assert Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"  # deploy turned it on
    assert "stopped penguins version 2" in mlkit("deploy", "penguins", "--stop", env=env, check=True).stdout


def test_monitor_enforce_rolls_back_a_drifting_champion(canary, tmp_path):
    "Injected drift in version 2's prediction log: `mlkit monitor --enforce` rolls champion back to 1, in the ledger."
    import datetime as dt

    import polars as pl

    from mlkit.predlog import read_prediction_log
    env = canary["env"]
    if json.loads(mlkit("models", "history", "penguins", "--json", env=env, check=True).stdout)[-1]["to_version"] != "2":
        mlkit("models", "promote", "penguins", "2", "--force", "--reason", "enforce test", env=env, check=True)
    folder = canary["root"] / "state" / "predictions" / "penguins"
    template = read_prediction_log(folder).head(1)
    start = dt.datetime.now() - dt.timedelta(hours=4)
    drifted = pl.concat([template] * 2400).with_columns(  # four hours of version-2 traffic with far too long bills
        (pl.lit(start) + pl.duration(seconds=pl.int_range(pl.len()) * 6)).alias("time"), pl.lit("2").alias("version"),
        pl.lit("champion").alias("answered_by"), pl.format("drift-{}", pl.int_range(pl.len())).alias("request_id"),
        pl.lit(69.0).alias("bill_length_mm"))
    drifted.write_parquet(folder / "part-99999999999999999999-injected.parquet")
    r = mlkit("monitor", "penguins", "--version", "2", "--enforce", "--html", tmp_path / "report.html", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "champion rolled back 2 -> 1" in r.stdout
    hist = json.loads(mlkit("models", "history", "penguins", "--json", env=env, check=True).stdout)
    last = hist[-1]
    assert (last["action"], last["from_version"], last["to_version"]) == ("rollback", "2", "1")
    assert "mlkit monitor --enforce" in last["reason"] and "bill_length_mm" in last["reason"]
    html = (tmp_path / "report.html").read_text()
    assert "ALERT" in html and "bill_length_mm" in html and "<script" not in html
