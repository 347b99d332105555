"""Drift detection on the synthetic generator with the default `[monitor]` thresholds: no false alarm without drift,
each injected kind of drift found and blamed on the right column; the one-pass tally agrees with a plain count."""
import datetime as dt

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlkit.config import load_settings
from mlkit.contracts import synthetic_contract
from mlkit.data import synthetic
from mlkit.profiles import profile_frame
from mlkit.drift import drift, tally, thresholds
from mlkit.monitoring import monitor

FEATURES = ["age", "income", "sessions", "score", "region", "plan"]
LABEL = "churned"
REF_ROWS, LIVE_ROWS = 20_000, 10_000


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    "Built-in settings: no settings file of the repo, no MLKIT_ variable."
    ini = tmp_path_factory.mktemp("settings") / "settings.ini"
    ini.write_text("# defaults only\n")
    s = load_settings(ini, env={})
    assert thresholds(s) == {"psi": 0.1, "null_rate_change": 0.05, "unseen_rate": 0.01, "prediction_psi": 0.1, "min_rows": 500}
    return s


def contract() -> dict:
    "The contract a model trained on the synthetic features would carry: features + label, as classes `False`/`True`."
    c = synthetic_contract().subset(FEATURES).to_dict()
    c["columns"][LABEL]["categories"] = ["False", "True"]
    return c


def reference(seed: int) -> dict:
    "The training profile, as training computes it: the features and the label of the training rows."
    return profile_frame(synthetic(REF_ROWS, seed=seed).select(*FEATURES, LABEL))


def served(df: pl.DataFrame, hours: float = 2.0, start=dt.datetime(2026, 11, 1, 9)) -> pl.DataFrame:
    "`df` as the prediction log holds it: features as the contract types them, the class a model gave (here the true one),"
    "version, time spread evenly over `hours`, request ids."
    i = pl.int_range(pl.len())
    return df.select(
        (pl.lit(start) + pl.duration(microseconds=(i * (hours * 3.6e9 / len(df))).cast(pl.Int64))).alias("time"),
        pl.format("r-{}", i // 10).alias("request_id"), (i % 10).alias("row"), pl.lit("champion").alias("answered_by"),
        pl.lit("churn").alias("model"), pl.lit("1").alias("version"),
        *[pl.col(c).cast(pl.Float64) for c in ["age", "income", "sessions", "score"]], "region", "plan",
        pl.col(LABEL).cast(pl.String).str.to_titlecase().alias("prediction"))


def test_no_drift_raises_no_alert_in_19_of_20_seeds(defaults):
    alarms = {}
    for s in range(20):
        rep = monitor(served(synthetic(LIVE_ROWS, seed=1000 + s)), reference(s), contract(), defaults)
        assert len(rep["windows"]) == 2 and all(w["rows"] >= 500 for w in rep["windows"])
        if rep["alert"] or any(w["alert"] for w in rep["windows"]):
            alarms[s] = rep["alerts"] + [a for w in rep["windows"] for a in w["alerts"]]
    assert len(alarms) <= 1, alarms


def test_no_drift_at_the_smallest_judged_window(defaults):
    "500 rows (`min_rows`): the noisiest sample that is still judged."
    alarms = {}
    for s in range(20):
        rep = monitor(served(synthetic(500, seed=1000 + s), hours=0.5), reference(s), contract(), defaults)
        assert rep["judged"]
        if rep["alert"]: alarms[s] = rep["alerts"]
    assert len(alarms) <= 1, alarms


DRIFTS = {  # kind: (synthetic(...) arguments, the column every alert must name, the check that must fire)
    "mean shift": ({"mean_shift": {"age": 0.5}}, "age", "PSI"),
    "variance change": ({"variance_scale": {"score": 1.5}}, "score", "PSI"),
    "variance change (skewed)": ({"variance_scale": {"income": 2.0}}, "income", "PSI"),
    "new category": ({"new_category": 0.05}, "region", "never seen in training"),
    "missing-rate jump": ({"missing_rate": {"income": 0.2}}, "income", "null rate"),
    "label shift": ({"label_rate": 0.6}, "prediction", "class distribution"),
}


@pytest.mark.parametrize("kind", DRIFTS)
def test_each_kind_of_drift_is_detected_and_attributed(defaults, kind):
    kwargs, column, check = DRIFTS[kind]
    for s in range(5):
        rep = monitor(served(synthetic(LIVE_ROWS, seed=2000 + s, **kwargs)), reference(s), contract(), defaults)
        assert rep["alert"], (kind, s)
        assert any(check in a for a in rep["alerts"]), (kind, s, rep["alerts"])
        assert all(a.startswith(f"{column}: ") for a in rep["alerts"]), (kind, s, rep["alerts"])  # blamed on it alone
        assert all(w["alert"] for w in rep["windows"])  # and in every (hourly) window


def test_label_shift_through_late_labels(defaults):
    "A model blind to the shift keeps predicting the old class mix: the true labels, joined later, show the shift."
    live = served(synthetic(LIVE_ROWS, seed=3000, label_rate=0.6))
    blind = served(synthetic(LIVE_ROWS, seed=3001))["prediction"]
    labels = live.select("request_id", "row", pl.col("prediction").alias("label"))
    rep = monitor(live.with_columns(blind), reference(0), contract(), defaults, labels=labels)
    assert rep["alerts"] and all(a.startswith("true_label: class distribution PSI") for a in rep["alerts"]), rep["alerts"]
    assert rep["label_drift"]["psi"] > 0.1 and rep["classes"]["psi"] < 0.01
    assert rep["performance"]["labelled_rows"] == LIVE_ROWS


def test_each_window_is_judged_as_if_alone(defaults):
    "The windows come out of one grouped count of the log: each must equal `drift` of its own rows."
    profile, limits = reference(0), thresholds(defaults)
    hours = [synthetic(3000, seed=4000), synthetic(3000, seed=4001), synthetic(3000, seed=4002, mean_shift={"age": 1.0})]
    log = pl.concat([served(h, hours=1, start=dt.datetime(2026, 11, 1, 9 + k)) for k, h in enumerate(hours)])
    log = log.sample(fraction=1.0, shuffle=True, seed=0)  # parts are not written in time order under load
    rep = monitor(log, profile, contract(), defaults)
    assert [w["alert"] for w in rep["windows"]] == [False, False, True]
    for w in rep["windows"]:
        alone = drift(profile, log.filter(pl.col("time").dt.truncate("1h") == dt.datetime.fromisoformat(w["start"])), FEATURES, limits,
                      "prediction", LABEL)
        assert (w["rows"], w["alerts"]) == (alone["rows"], alone["alerts"])
        assert w["psi"] == {d["column"]: d["psi"] for d in alone["columns"]}
        assert w["prediction_psi"] == alone["classes"]["psi"]
    whole = drift(profile, log, FEATURES, limits, "prediction", LABEL)
    assert {k: rep[k] for k in whole} == whole


values = st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 3).map(float)),
                  max_size=60)


@settings(max_examples=200, deadline=None)
@given(values, st.lists(st.integers(-4, 4).map(lambda v: v / 2), unique=True, max_size=6).map(sorted),
       st.lists(st.integers(0, 2), min_size=60, max_size=60))
def test_tally_counts_like_a_plain_count(xs, edges, groups):
    "Bins `(-inf, e0], (e0, e1], ..., (ek, inf)` of the finite values, nulls apart, NaN and infinities left out."
    profile = {"columns": {"x": {"kind": "number", "null_rate": 0.0, "bins": {"edges": edges, "shares": []}}}}
    by = pl.Series(groups[:len(xs)])
    got = tally(pl.DataFrame({"x": pl.Series(xs, dtype=pl.Float64)}), profile, {"x": "x"}, by)
    for g in set(by.to_list()):
        x = [v for v, k in zip(xs, groups) if k == g]
        finite = np.array([v for v in x if v is not None and np.isfinite(v)])
        expect = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=len(edges) + 1).tolist()
        assert got[g] == {"rows": len(x), "columns": {"x": {"nulls": sum(v is None for v in x), "counts": expect}}}
    assert set(got) == set(by.to_list())
