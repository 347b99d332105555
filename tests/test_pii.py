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


def hashed(**extra) -> Contract:
    c = contract(**extra)
    c.columns["email"] = {"dtype": "string", "unique": True, "pii": True, "encode": "hash", "buckets": 8}
    return Contract(c.name, c.columns, c.label, c.slices, c.rows, c.path, c.task, c.key)


def project(tmp_path, extra: str = ""):
    "Settings of a throwaway project (state in tmp_path), applied in this process (`clean_environ` undoes it)."
    import mlkit.config
    (ini := tmp_path / "settings.ini").write_text(f"[project]\nstate_dir = state\n{extra}")
    return mlkit.config.configure(load_settings(ini, env={}))


def test_a_pii_feature_without_the_hash_encoding_is_refused_at_prepare(tmp_path, clean_environ):
    "One line naming the column and the fix, before anything is fitted on it."
    from mlkit.pipeline import prepare
    settings = project(tmp_path)
    with pytest.raises(DataError) as e: prepare("customers", "customers.parquet", contract(), settings=settings, data=frame())
    assert "column 'email' is pii" in str(e.value) and "add `encode: hash` to it in the contract" in str(e.value) and "\n" not in str(e.value)
    p = prepare("customers", "customers.parquet", contract(), features=["age", "plan"], settings=settings, data=frame())  # left out: fine
    assert p.spec.output_names == ["age", "plan=basic", "plan=pro"]


def test_a_hashed_pii_feature_trains_only_with_its_key_and_stores_no_value(tmp_path, clean_environ, monkeypatch):
    "The key's variable is the one `[features] pii_key_env` names; unset or short it stops `prepare`; set, no e-mail reaches the spec, profile or report."
    from mlkit.config import SettingsError
    from mlkit.pipeline import prepare
    settings = project(tmp_path, "[features]\npii_key_env = SHOP_FEATURE_KEY\n")
    monkeypatch.delenv("SHOP_FEATURE_KEY", raising=False)
    with pytest.raises(SettingsError, match=r"^\[features\] pii_key_env = SHOP_FEATURE_KEY: set SHOP_FEATURE_KEY to a secret of at least 16 bytes"):
        prepare("customers", "customers.parquet", hashed(), settings=settings, data=frame())
    monkeypatch.setenv("SHOP_FEATURE_KEY", "too short")
    with pytest.raises(SettingsError, match="SHOP_FEATURE_KEY holds 9 bytes"): prepare("customers", "customers.parquet", hashed(), settings=settings, data=frame())
    monkeypatch.setenv("SHOP_FEATURE_KEY", "a long enough secret for the shop")
    p = prepare("customers", "customers.parquet", hashed(), settings=settings, data=frame())
    assert p.spec.output_names[:8] == [f"email#{j}" for j in range(8)] and p.X_train.shape[1] == 8 + 1 + 2
    assert p.X_train[:, :8].sum(1).tolist() == [1.0] * len(p.X_train)
    (step,) = [s for s in p.spec.steps if s["column"] == "email"]
    assert step["key_env"] == "SHOP_FEATURE_KEY" and set(step) == {"op", "column", "buckets", "key_env", "key_id"}
    stored = p.spec.to_json() + json.dumps(p.profile) + p.report.to_json() + json.dumps(p.model_contract.to_dict())
    assert raw_values_in(stored) == [] and "a long enough secret" not in stored


def test_a_contract_lists_no_value_of_a_pii_column():
    "Categories or a range of a pii column would travel in every bundle's contract: refused, naming the column and what to drop."
    cols = contract().columns
    with pytest.raises(DataError, match="column 'email' is pii: drop its categories"):
        Contract("customers", {**cols, "email": {"dtype": "string", "pii": True, "categories": EMAILS[:2]}}, label="churned")
    with pytest.raises(DataError, match="encode 'hash'"):
        Contract("customers", {**cols, "age": {"dtype": "float", "encode": "hash"}}, label="churned")
    stored = {**contract().to_dict(), "columns": {**cols, "email": {"dtype": "string", "pii": True, "categories": EMAILS[:2]}}}
    assert Contract.from_dict(stored).pii == ["email"]  # what an earlier mlkit stored in a bundle still loads
