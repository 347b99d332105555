"""`pii` columns: no raw value of theirs reaches a contract report, a reference profile or the prediction log."""
import hmac
import json

import polars as pl
import pytest

from mlkit.contracts import Contract, validate
from mlkit.data import DataError
from mlkit.config import load_settings
from mlkit.predlog import PII_KEY_ENV, PredictionLog, pii_key, read_prediction_log
from mlkit.profiles import profile_frame

EMAILS = [f"person{i}@example.org" for i in range(40)]


def contract(**extra) -> Contract:
    return Contract("customers", {
        "email": {"dtype": "string", "unique": True, "pii": True},
        "age": {"dtype": "int", "min": 18, "max": 99},
        "plan": {"dtype": "string", "categories": ["basic", "pro"]},
        "churned": {"dtype": "string", "categories": ["no", "yes"]},
    }, label="churned", **extra)


def frame(n: int = 40) -> pl.DataFrame:
    return pl.DataFrame({"email": EMAILS[:n], "age": [20 + i for i in range(n)], "plan": ["basic", "pro"] * (n // 2),
                         "churned": ["no", "yes"] * (n // 2)})


def raw_values_in(text: str) -> list[str]:
    return [e for e in EMAILS if e in text]


def test_a_failed_check_on_a_pii_column_shows_no_value():
    "Duplicated e-mails fail `unique`: the report counts them and shows `<pii>`, never the addresses."
    df = frame().with_columns(pl.when(pl.col("age") < 25).then(pl.lit(EMAILS[0])).otherwise(pl.col("email")).alias("email"))
    report = validate(df, contract(), source="customers.parquet")
    failed = {(c.column, c.check) for c in report.failures}
    assert failed == {("email", "unique")}
    assert report.failures[0].examples and all(ex["email"] == "<pii>" for ex in report.failures[0].examples)
    assert raw_values_in(report.to_json() + report.text()) == []


def test_a_profile_keeps_the_null_rate_of_a_pii_column_and_none_of_its_values():
    prof = profile_frame(frame(), pii=contract().pii)
    assert prof["columns"]["email"] == {"dtype": "String", "null_rate": 0.0, "kind": "pii"}
    assert prof["columns"]["plan"]["frequencies"] == {"basic": 0.5, "pro": 0.5}  # other columns as before
    assert raw_values_in(json.dumps(prof)) == []


def test_a_pii_column_cannot_be_a_slice_or_the_label():
    "Metrics per slice name the slice's values in run metrics and model cards: a pii slice is refused up front."
    with pytest.raises(DataError, match="'email' is pii"):
        contract(slices=["email"])


def test_the_prediction_log_holds_keyed_hashes_of_pii_values(tmp_path):
    "Served rows with a pii feature: the log has HMAC-SHA256 hex under the project key, never the raw value."
    ini = tmp_path / "settings.ini"
    ini.write_text("[project]\nstate_dir = state\n")
    settings = load_settings(ini, env={})
    key = pii_key(settings, env={})
    c = contract().to_dict()
    rows = [{k: v for k, v in r.items() if k != "churned"} for r in frame(4).to_dicts()]
    log = PredictionLog(tmp_path / "log", c, flush_rows=2, flush_seconds=0.1, pii_key=key)
    log.log(rows, {"model": "m", "version": "1", "predictions": [{"label": "no", "probabilities": {"no": 0.9, "yes": 0.1}}] * 4}, "r1")
    log.close()
    logged = read_prediction_log(tmp_path / "log")
    assert logged["email"].to_list() == [hmac.digest(key, e.encode(), "sha256").hex() for e in EMAILS[:4]]
    assert logged["age"].to_list() == [20.0, 21.0, 22.0, 23.0]  # other features stay readable for monitoring
    blob = b"".join(p.read_bytes() for p in (tmp_path / "log").glob("part-*.parquet"))
    assert not any(e.encode() in blob for e in EMAILS)
    # the key is the project's: the same on the next call, another with another key (no rainbow table across projects)
    assert pii_key(settings, env={}) == key and pii_key(settings, env={PII_KEY_ENV: "other"}) != key


def test_mlkit_data_profile_with_the_contract_keeps_no_pii_value(tmp_path):
    "`mlkit data profile DATA --contract C`: the CLI's profile follows the contract's pii flags too."
    import subprocess
    import sys
    from pathlib import Path
    frame().write_parquet(data := tmp_path / "customers.parquet")
    (c := tmp_path / "customers.contract.json").write_text(json.dumps(contract().to_dict()))
    mlkit = Path(sys.executable).parent / "mlkit"
    out = subprocess.run([str(mlkit), "data", "profile", str(data), "--contract", str(c)], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["columns"]["email"]["kind"] == "pii" and raw_values_in(out) == []
