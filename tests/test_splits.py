"""`mlkit.splits`: each strategy on data where the wrong one shows, sizes as asked, the record, and the choice per model."""
import numpy as np
import polars as pl
import pytest

from mlkit.config import load_settings
from mlkit.contracts import Contract
from mlkit.data import DataError
from mlkit.splits import split, split_for


def visits(n_patients: int = 120, seed: int = 0) -> pl.DataFrame:
    "Several visits per patient (1 to 9), in time order, with a float outcome and a rare class."
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 10, n_patients)
    patient = np.repeat(np.arange(n_patients), per)
    n = len(patient)
    return pl.DataFrame({"visit": np.arange(n), "patient": patient, "day": rng.permutation(n) * 3 + 1,
                         "outcome": rng.normal(100, 20, n), "kind": np.where(rng.random(n) < 0.04, "rare", "common")})


@pytest.mark.parametrize("seed", range(5))
def test_grouped_never_puts_a_group_on_two_sides(seed):
    df = visits(seed=seed)
    s = split(df, "grouped", column="patient", seed=seed)
    sides = [set(p["patient"].to_list()) for p in (s.train, s.val, s.test)]
    assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2], sides
    assert sum(len(p) for p in (s.train, s.val, s.test)) == len(df) and len(s.test) and len(s.val)
    r = split(df, "random", seed=seed)  # the wrong strategy shows: patients seen in training are tested
    assert set(r.train["patient"].to_list()) & set(r.test["patient"].to_list())


def test_grouped_keeps_a_missing_group_together():
    df = visits().with_columns(pl.when(pl.col("patient") < 10).then(None).otherwise(pl.col("patient")).alias("patient"))
    s = split(df, "grouped", column="patient", seed=1)
    holding = [p["patient"].null_count() for p in (s.train, s.val, s.test)]
    assert sorted(holding)[:2] == [0, 0] and sum(holding) == df["patient"].null_count()


@pytest.mark.parametrize("test_size,val_size", [(0.2, 0.15), (0.3, 0.0), (0.1, 0.3)])
def test_time_never_tests_on_the_past(test_size, val_size):
    df = visits(seed=3)
    s = split(df, "time", column="day", test_size=test_size, val_size=val_size)
    assert s.train["day"].max() < s.test["day"].min()
    if len(s.val): assert s.train["day"].max() < s.val["day"].min() and s.val["day"].max() < s.test["day"].min()
    assert len(s.test) == round(len(df) * test_size) and len(s.val) == round(len(df) * val_size)
    r = split(df, "random", test_size=test_size, val_size=val_size, seed=0)  # the wrong strategy tests on the past
    assert r.train["day"].max() > r.test["day"].min()


def test_time_keeps_rows_of_one_instant_together():
    df = pl.DataFrame({"t": [1, 2, 2, 2, 3, 4, 5, 5, 5, 5], "y": range(10)})
    s = split(df, "time", column="t", test_size=0.3, val_size=0.0)
    assert s.test["t"].to_list() == [5, 5, 5, 5] and s.train["t"].max() == 4  # never one 5 in training and one in test


def test_stratified_tests_every_class_at_its_share():
    df = visits(seed=4)
    rare = (df["kind"] == "rare").sum()
    s = split(df, "stratified", column="kind", seed=0)
    assert (s.test["kind"] == "rare").sum() == round(rare * 0.2) and (s.val["kind"] == "rare").sum() == round(rare * 0.15)
    misses = sum((split(df, "random", seed=k).test["kind"] == "rare").sum() != round(rare * 0.2) for k in range(10))
    assert misses >= 5  # random gets the rare class's share wrong in most seeds


def test_regression_split_holds_out_what_was_asked():
    "A float label was stratified on and silently held out 14% instead of 20%: now `auto` is random for a regression."
    df = visits(seed=5)
    c = Contract("visits", {"visit": {"dtype": "int"}, "patient": {"dtype": "int"}, "day": {"dtype": "int"},
                            "outcome": {"dtype": "float"}, "kind": {"dtype": "string"}}, label="outcome", key=["visit"])
    s = split_for(df, c, _settings())
    assert s.record["strategy"] == "random" and len(s.test) == round(len(df) * 0.2) and len(s.val) == round(len(df) * 0.15)
    with pytest.raises(DataError, match="stratified needs a class label; 'outcome' holds numbers"):
        split(df, "stratified", column="outcome")


def test_record_names_the_test_rows():
    df = visits(seed=6)
    a, b = split(df, "random", seed=1, key=["visit"]), split(df, "random", seed=1, key=["visit"])
    assert a.record == b.record and a.record["test_rows_sha256"].startswith("sha256:")
    assert split(df, "random", seed=2, key=["visit"]).record["test_rows_sha256"] != a.record["test_rows_sha256"]
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=9)  # the same rows in another order: another draw, same rule
    assert split(shuffled, "random", seed=1, key=["visit"]).record["rows"] == a.record["rows"]
    assert set(a.record) >= {"format", "strategy", "seed", "column", "rows", "test_rows_sha256"}


@pytest.mark.parametrize("kw,needle", [
    (dict(strategy="grouped"), "grouped needs a column"),
    (dict(strategy="time", column="nope"), "'nope' is not one"),
    (dict(strategy="shuffle"), "not one of"),
    (dict(test_size=0.7, val_size=0.3), "together under 1"),
])
def test_bad_split_settings_are_named(kw, needle):
    with pytest.raises(DataError, match=needle): split(visits(), **kw)


def _settings(text: str = "", env: dict | None = None):
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp())
    (d / "settings.ini").write_text(text)
    return load_settings(d / "settings.ini", env=env or {})


def test_each_model_chooses_its_split():
    df = visits(seed=7)
    c = Contract("visits", {"visit": {"dtype": "int"}, "patient": {"dtype": "int"}, "day": {"dtype": "int"},
                            "outcome": {"dtype": "float"}, "kind": {"dtype": "string", "categories": ["common", "rare"]}},
                 label="kind", key=["visit"])
    s = _settings("[split]\ntest_size = 0.25\n[model.clinic]\nsplit.strategy = grouped\nsplit.column = patient\n",
                  env={"MLKIT_MODEL_AUDIT__SPLIT_STRATEGY": "time", "MLKIT_MODEL_AUDIT__SPLIT_COLUMN": "day"})
    assert split_for(df, c, s.for_model("other")).record["strategy"] == "stratified"  # auto, for a classifier
    g = split_for(df, c, s.for_model("clinic")).record
    assert (g["strategy"], g["column"], g["test_size"]) == ("grouped", "patient", 0.25)
    t = split_for(df, c, s.for_model("audit"))
    assert t.record["strategy"] == "time" and t.train["day"].max() < t.test["day"].min()


@pytest.mark.parametrize("kw,needle", [
    # a count label stratified on: each of its many values holds too few rows to give the test one
    (dict(strategy="stratified", column="count"), "left no test rows"),
    (dict(strategy="grouped", column="half", val_size=0.0), "too few groups or instants to hold out 20%"),
    (dict(strategy="time", column="half", val_size=0.0), "too few groups or instants"),
    (dict(strategy="random", val_size=0.0005), "left no validation rows"),
    (dict(strategy="time", column="text"), "declare it a date, datetime or number"),
])
def test_a_split_that_cannot_do_its_job_is_an_error(kw, needle):
    df = pl.DataFrame({"count": np.arange(600), "half": np.arange(600) % 2, "text": [f"t{i}" for i in range(600)]})
    with pytest.raises(DataError, match=needle): split(df, **kw)


def test_the_split_has_its_own_seed():
    "Another run seed keeps the split; another `[split] seed` changes it."
    df = visits(seed=8)
    c = Contract("v", {"visit": {"dtype": "int"}, "outcome": {"dtype": "float"}}, label="outcome", key=["visit"])
    a = split_for(df, c, _settings("[split]\nseed = 0\n")).record["test_rows_sha256"]
    assert split_for(df, c, _settings("[split]\nseed = 0\n")).record["test_rows_sha256"] == a
    assert split_for(df, c, _settings("[split]\nseed = 5\n")).record["test_rows_sha256"] != a
