"""A pii value is stored raw nowhere but in the data and its owner-only snapshot. A project (`mlkit init`, `mlkit new`)
trains a classifier whose contract has a pii feature (`pii: true, encode: hash`) through the real CLI and papermill,
promotes, builds and serves it with `bentoml serve`, and answers a request holding a planted pii value (the prediction
log on). Then every file under the project, its state folder (MLflow store and artifacts, BentoML home, snapshots,
runs, prediction log) and the processes' temporary folder is decoded (Parquet, SQLite cells, zip and tar members,
gzip, recursively) and searched for the planted value in its plain, JSON-, HTML-, URL- and repr-escaped forms, for the
marker every pii value of the data carries, and for the feature key itself. Serving with another key, or none, fails
at start naming the setting and the variable."""
import gzip
import hmac
import html
import io
import json
import os
import sqlite3
import stat
import tarfile
import tempfile
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import BIN, bento_served, mlkit

MARKER = "pii7q"  # in every pii value of the data, and nowhere else: any value found, not only the planted one
PLANTED = "Zoë \"Z\" O'Plant & Co <zoe.pii7q.planted@example.org>"  # quotes, an ampersand, angle brackets, a non-ASCII letter
KEY = "feature-key-for-the-pii-scan-3f9c2e7a"  # the feature hash key: found nowhere at all
PACKAGE = "piiscan_shop"


def end_to_end(test):
    "A test of the served project: real papermill runs and a real `bentoml serve` (the scanner's own test is neither)."
    return pytest.mark.papermill(pytest.mark.serve(test))


def forms(value: str) -> set[bytes]:
    "The forms a text takes in files: plain, CSV-quoted, JSON (ASCII and not, and JSON in JSON), HTML, URL, repr and unicode-escaped, lower-cased."
    j = json.dumps(value)
    out = {value, value.replace('"', '""'), j[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(j)[1:-1], html.escape(value),
           html.escape(value, quote=False), urllib.parse.quote(value), urllib.parse.quote_plus(value), repr(value)[1:-1]}
    return {f.encode().lower() for f in out} | {value.encode("unicode_escape").lower()}


def decoded(data: bytes, name: str, depth: int = 0):
    "`(where, bytes)` of a file and of everything decoded from it: Parquet values, SQLite cells, zip/tar members, gzip."
    yield name, data
    if depth > 5: return
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        df = pl.read_parquet(io.BytesIO(data))
        for c in df.columns:
            for i, v in enumerate(df[c].to_list()):
                if isinstance(v, bytes): yield from decoded(v, f"{name}!{c}[{i}]", depth + 1)
        yield f"{name}!values", json.dumps(df.to_dicts(), default=str, ensure_ascii=False).encode()
    elif data[:16] == b"SQLite format 3\x00":
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "db").write_bytes(data)
            con = sqlite3.connect(Path(d) / "db")
            try:
                for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                    for row in con.execute(f'SELECT * FROM "{table}"'):
                        for i, v in enumerate(row):
                            if isinstance(v, str): v = v.encode()
                            if isinstance(v, bytes): yield from decoded(v, f"{name}!{table}[{i}]", depth + 1)
            finally: con.close()
    elif data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for m in z.namelist(): yield from decoded(z.read(m), f"{name}!{m}", depth + 1)
    elif data[:2] == b"\x1f\x8b":
        yield from decoded(gzip.decompress(data), f"{name}!gunzip", depth + 1)
    elif data[257:262] == b"ustar":
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in t.getmembers():
                if m.isfile(): yield from decoded(t.extractfile(m).read(), f"{name}!{m.name}", depth + 1)


def scan(root: Path, needles: dict[str, set[bytes]]) -> dict[str, dict[str, list[str]]]:
    "Every file under `root` (links not followed) whose bytes, or anything decoded from them, hold a needle: {needle: {file: [where]}}."
    hits: dict = {k: {} for k in needles}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file(): continue
            rel = str(p.relative_to(root))
            for where, data in decoded(p.read_bytes(), rel):
                low = data.lower()
                for k, fs in needles.items():
                    if any(x in low for x in fs): hits[k].setdefault(rel, []).append(where)
    return hits


def test_the_scan_decodes_what_it_must(tmp_path):
    "The scanner finds a value inside Parquet, a SQLite blob, a zip in a gzip, a tar, JSON, HTML and URL escapes; not where it is not."
    v = PLANTED
    pl.DataFrame({"a": [v]}).write_parquet(tmp_path / "a.parquet", compression="zstd")
    con = sqlite3.connect(tmp_path / "b.db")
    con.execute("CREATE TABLE t (x BLOB)"); con.execute("INSERT INTO t VALUES (?)", (gzip.compress(json.dumps({"v": v}).encode()),))
    con.commit(); con.close()
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf: zf.writestr("in/side.html", f"<p>{html.escape(v)}</p>")
    (tmp_path / "c.zip.gz").write_bytes(gzip.compress(z.getvalue()))
    t = io.BytesIO()
    with tarfile.open(fileobj=t, mode="w:gz") as tf:
        info = tarfile.TarInfo("x.txt"); payload = urllib.parse.quote(v).encode(); info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    (tmp_path / "d.tar.gz").write_bytes(t.getvalue())
    (tmp_path / "e.json").write_text(json.dumps({"rows": [{"email": v}]}))  # ASCII-escaped: \u00eb, \"
    (tmp_path / "f.txt").write_text(f"the marker alone: {MARKER.upper()}-something")
    pl.DataFrame({"a": ["nothing here"]}).write_parquet(tmp_path / "clean.parquet")
    hits = scan(tmp_path, {"planted": forms(v), "marker": {MARKER.encode()}})
    assert set(hits["planted"]) == {"a.parquet", "b.db", "c.zip.gz", "d.tar.gz", "e.json"}, hits
    assert set(hits["marker"]) == {"a.parquet", "b.db", "c.zip.gz", "d.tar.gz", "e.json", "f.txt"}, hits
    assert "a.parquet!values" in hits["planted"]["a.parquet"]  # found by decoding (zstd pages hide it from a byte search)


def customers(n: int = 300, seed: int = 3) -> pl.DataFrame:
    "Churn from tenure and plan; each customer's e-mail (pii, carrying the marker) is a feature too; row 7 is the planted value."
    rng = np.random.default_rng(seed)
    tenure, plan = rng.integers(1, 61, n), rng.choice(["basic", "plus", "pro"], n)
    churned = np.where(rng.random(n) < 1 / (1 + np.exp(-(1.5 - 0.08 * tenure))), "yes", "no")
    emails = [f"customer{i}.{MARKER}@example.org" for i in range(n)]
    emails[7] = PLANTED
    return pl.DataFrame({"customer_id": np.arange(1000, 1000 + n), "email": emails, "tenure": tenure, "plan": plan, "churned": churned})


@pytest.fixture(scope="module")
def served_project(tmp_path_factory):
    "init, new, a refused training (no key), a training, promote, build; served with a wrong key, none, then the right one."
    work = tmp_path_factory.mktemp("pii-scan")
    (work / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_DISABLE_TELEMETRY="true", BENTOML_DO_NOT_TRACK="true",
               TMPDIR=str(work / "tmp"))  # the processes' temporary files are scanned too
    mlkit("init", PACKAGE, env=env, cwd=work, check=True)
    root = work / PACKAGE
    ini = root / "settings.ini"
    ini.write_text(ini.read_text().replace("\nstate_dir = .mlkit\n", "\nstate_dir = state\n", 1))  # not hidden: BentoML refuses hidden build paths
    assert "\nstate_dir = state\n" in ini.read_text()
    env["MLKIT_SETTINGS"] = str(ini)
    (root / "data").mkdir()
    customers().write_csv(root / "data" / "customers.csv")
    mlkit("new", "churn", "--data", "data/customers.csv", "--label", "churned", "--key", "customer_id", env=env, cwd=root, check=True)
    import yaml
    cpath = root / "nbs" / "train" / "churn.contract.yaml"
    contract = yaml.safe_load(cpath.read_text())
    contract["columns"]["email"] = {"dtype": "string", "unique": True, "pii": True, "encode": "hash", "buckets": 16}
    cpath.write_text(yaml.safe_dump(contract, sort_keys=False, allow_unicode=True))
    out = {"no_key": mlkit("train", "churn", "-f", "nbs/train/churn.yaml", env=env, cwd=root)}
    keyed = {**env, "MLKIT_FEATURE_KEY": KEY}
    out["train"] = mlkit("train", "churn", "-f", "nbs/train/churn.yaml", env=keyed, cwd=root, check=True)
    out["promote"] = mlkit("models", "promote", "churn", env=keyed, cwd=root, check=True)
    bento = mlkit("build", "churn", env=keyed, cwd=root, check=True).stdout.strip().splitlines()[-1]
    log = root / "serve.log"
    with pytest.MonkeyPatch.context() as mp:  # the test process's own environment must not lend the key
        mp.delenv("MLKIT_FEATURE_KEY", raising=False)
        for name, extra in (("wrong_key", {"MLKIT_FEATURE_KEY": "another-key-of-enough-bytes-0000"}), ("no_key_serve", {})):
            try:
                with bento_served(bento, ini, env, log, extra_env=extra): out[name] = "started"
            except RuntimeError as e: out[name] = str(e)
        rows = [{"email": PLANTED, "tenure": 3, "plan": "basic"}, {"email": "customer11.pii7q@example.org", "tenure": 40, "plan": "pro"},
                {"email": "unseen.pii7q@example.org", "tenure": 12, "plan": "plus"}]
        from mlkit.demo import post_json
        with bento_served(bento, ini, keyed, log) as (url, _):
            out["predict"] = post_json(f"{url}/predict", {"rows": rows})
    return {"work": work, "root": root, "state": root / "state", "out": out, "bento": bento}


@end_to_end
def test_training_without_the_key_fails_naming_the_setting_and_the_variable(served_project):
    r = served_project["out"]["no_key"]
    assert r.returncode != 0
    assert "[features] pii_key_env = MLKIT_FEATURE_KEY: set MLKIT_FEATURE_KEY" in r.stdout + r.stderr, (r.stdout[-2000:], r.stderr[-2000:])


@end_to_end
def test_serving_with_another_key_or_none_fails_at_start(served_project):
    out = served_project["out"]
    assert "[features] pii_key_env = MLKIT_FEATURE_KEY: MLKIT_FEATURE_KEY is not the key the feature spec was fitted with" in out["wrong_key"], out["wrong_key"]
    assert "[features] pii_key_env = MLKIT_FEATURE_KEY: set MLKIT_FEATURE_KEY" in out["no_key_serve"], out["no_key_serve"]


@end_to_end
def test_the_served_request_is_answered_and_logged_as_a_keyed_hash(served_project):
    status, body, _ = served_project["out"]["predict"]
    assert status == 200 and len(body["predictions"]) == 3 and {p["label"] for p in body["predictions"]} <= {"yes", "no"}, body
    from mlkit.predlog import read_prediction_log
    state = served_project["state"]
    logged = read_prediction_log(state / "predictions" / "churn")
    assert logged.height == 3, logged
    key = bytes.fromhex((state / "pii.key").read_text().strip())  # the log's own key (MLKIT_PII_KEY unset): not the feature key
    assert logged["email"][0] == hmac.digest(key, PLANTED.encode(), "sha256").hex()
    spec = json.loads(next((state / "bentoml" / "models" / "churn").glob("*/bundle/features.json")).read_text())
    (step,) = [s for s in spec["steps"] if s.get("column") == "email"]
    assert step == {"op": "hash", "column": "email", "buckets": 16, "key_env": "MLKIT_FEATURE_KEY", "key_id": step["key_id"]}
    assert spec["format"] == 2 and len(step["key_id"]) == 12


@end_to_end
def test_no_pii_value_and_no_key_is_stored_outside_the_data_and_its_owner_only_snapshot(served_project):
    work, root, state = served_project["work"], served_project["root"], served_project["state"]
    log_key = bytes.fromhex((state / "pii.key").read_text().strip())
    hashed = hmac.digest(log_key, PLANTED.encode(), "sha256").hex().encode()
    hits = scan(work, {"planted": forms(PLANTED), "marker": {MARKER.encode()}, "key": forms(KEY) | {KEY.encode().hex().encode()}, "logged": {hashed}})
    (snap,) = [p for p in (state / "snapshots").rglob("*.parquet")]
    source, snapshot = str((root / "data" / "customers.csv").relative_to(work)), str(snap.relative_to(work))
    # the scan sees what it must: the planted value in the source and, decoded, in the snapshot; its hash in the log's (lz4) part
    assert {source, snapshot} <= set(hits["planted"]), hits["planted"]
    assert [Path(f).parent.name for f in hits["logged"]] == ["churn"] and all("!values" in " ".join(w) for w in hits["logged"].values()), hits["logged"]
    assert hits["key"] == {}, f"the feature key is stored in {hits['key']}"
    leaks = {f: w for f, w in {**hits["marker"], **hits["planted"]}.items() if f not in (source, snapshot)}
    assert leaks == {}, "pii values stored outside the data and its snapshot:\n" + "\n".join(f"{f}: {sorted(set(w))[:4]}" for f, w in sorted(leaks.items()))
    mode = stat.S_IMODE(snap.stat().st_mode)
    assert mode & 0o077 == 0, f"{snapshot}: mode {mode:o}: a snapshot holding pii values is for its owner only (0600 or 0400)"
