"""Feature spec parity: the batch path and the record path give identical outputs for every row, and a spec loaded
from JSON gives what the fitted object gives (property-based, 500 generated cases)."""
import json
import math
import re
import statistics
from fractions import Fraction

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlkit.features import FeatureSpec

INPUTS = [{"name": "x", "kind": "number"}, {"name": "n", "kind": "number"}, {"name": "cat", "kind": "string"},
          {"name": "flag", "kind": "bool"}]
STEPS = [
    {"op": "derive", "name": "ratio", "expr": "x / n + log1p(abs(n))"},
    {"op": "impute", "column": "ratio", "strategy": "mean"}, {"op": "standardize", "column": "ratio"},
    {"op": "impute", "column": "x", "strategy": "median"}, {"op": "clip", "column": "x", "q_lower": 0.1, "q_upper": 0.9},
    {"op": "log", "column": "x"}, {"op": "minmax", "column": "x"},
    {"op": "bucketize", "column": "n", "n_bins": 3}, {"op": "passthrough", "column": "n"},
    {"op": "one_hot", "column": "cat", "unknown": "bucket"}, {"op": "ordinal", "column": "cat"},
    {"op": "impute", "column": "cat", "strategy": "most_frequent"}, {"op": "one_hot", "column": "cat", "name": "cat_filled"},
    {"op": "passthrough", "column": "flag"},
]
numbers = st.one_of(st.none(), st.just(float("nan")), st.floats(-1e6, 1e6), st.integers(-1000, 1000).map(float))


@st.composite
def frames(draw, min_rows=1, cats=("a", "b", "c")):
    n = draw(st.integers(min_rows, 25))
    col = lambda s: draw(st.lists(s, min_size=n, max_size=n))
    return pl.DataFrame({"x": col(numbers), "n": col(st.one_of(st.none(), st.integers(-50, 50))),
                         "cat": col(st.one_of(st.none(), st.sampled_from(cats))), "flag": col(st.one_of(st.none(), st.booleans()))},
                        schema={"x": pl.Float64, "n": pl.Int64, "cat": pl.String, "flag": pl.Boolean})


def same(a, b): np.testing.assert_array_equal(a, b)  # NaN == NaN for array_equal on floats


def exact_median(ordered: list) -> float:
    "The correctly rounded median of sorted values: the mean of the middle one or two in exact (Fraction) arithmetic."
    middle = ordered[(len(ordered) - 1) // 2:len(ordered) // 2 + 1]
    return float(sum(map(Fraction, middle)) / len(middle))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train=frames(min_rows=2), serve=frames(cats=("a", "b", "zz", "")))
def test_batch_and_records_agree(train, serve):
    spec = FeatureSpec(STEPS, INPUTS).fit(train)
    batch = spec.transform(serve)
    assert batch.shape == (len(serve), len(spec.output_names)) and batch.dtype == np.float32
    same(spec.transform_records(serve.to_dicts()), batch)
    loaded = FeatureSpec.from_json(json.dumps(json.loads(spec.to_json())))
    same(loaded.transform(serve), batch)
    same(loaded.transform_records(serve.to_dicts()), batch)
    assert np.isfinite(batch).all()  # every odd value follows a policy: no NaN or inf reaches the model


# the encoders a served record takes without a frame (mlkit.features._transform_values): numeric chains and one-hot
DIRECT_STEPS = [
    {"op": "impute", "column": "x", "strategy": "median"}, {"op": "clip", "column": "x", "q_lower": 0.1, "q_upper": 0.9},
    {"op": "standardize", "column": "x"}, {"op": "minmax", "column": "n"}, {"op": "passthrough", "column": "flag"},
    {"op": "one_hot", "column": "cat", "unknown": "bucket"},
    {"op": "impute", "column": "cat", "strategy": "most_frequent"}, {"op": "one_hot", "column": "cat", "name": "cat_filled"},
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train=frames(min_rows=2), serve=frames(cats=("a", "b", "zz", "")))
def test_records_without_a_frame_agree_with_the_frame_path(train, serve):
    "A request's records skip polars (numpy encoders fed the values): bit for bit what `transform` gives on a frame."
    from mlkit.features import _transform_values
    spec = FeatureSpec(DIRECT_STEPS, INPUTS).fit(train)
    direct = _transform_values(spec, serve.to_dicts())
    assert direct is not None  # the spec is one the direct path takes
    same(direct, spec.transform(serve))
    same(spec.transform_records(serve.to_dicts()), direct)


def test_records_with_missing_keys_and_ints():
    train = pl.DataFrame({"x": [1.0, 2.0, 3.0], "n": [1, 2, 3], "cat": ["a", "b", "a"], "flag": [True, False, True]})
    spec = FeatureSpec(STEPS, INPUTS).fit(train)
    rows = [{"x": 2}, {"n": 2, "cat": "b", "flag": False}, {}]
    frame = pl.DataFrame({"x": [2.0, None, None], "n": [None, 2, None], "cat": [None, "b", None], "flag": [None, False, None]},
                         schema={"x": pl.Float64, "n": pl.Int64, "cat": pl.String, "flag": pl.Boolean})
    same(spec.transform_records(rows), spec.transform(frame))


@pytest.mark.parametrize("row,msg", [({"x": "1"}, "rows[0].x: expected a number"),
                                     ({"cat": 3}, "rows[0].cat: expected a string"),
                                     ({"flag": "yes"}, "rows[0].flag: expected true or false")])
def test_wrong_types_name_the_field(row, msg):
    spec = FeatureSpec(STEPS, INPUTS).fit(pl.DataFrame({"x": [1.0, 2.0], "n": [1, 2], "cat": ["a", "b"], "flag": [True, False]}))
    with pytest.raises(ValueError, match=re.escape(msg)): spec.transform_records([row])


def test_spec_json_is_data_not_code():
    with pytest.raises(ValueError, match="not allowed"):
        FeatureSpec([{"op": "derive", "name": "z", "expr": "__import__('os').getcwd()"}], INPUTS)
    with pytest.raises(ValueError, match="unknown column 'y'"):
        FeatureSpec([{"op": "standardize", "column": "y"}], INPUTS)


def test_duplicate_outputs_are_refused():
    train = pl.DataFrame({"x": [1.0, 2.0], "n": [1, 2], "cat": ["a", "b"], "flag": [True, False]})
    with pytest.raises(ValueError, match="output 'cat=a' is produced twice"):
        FeatureSpec([{"op": "one_hot", "column": "cat"}, {"op": "one_hot", "column": "cat"}], INPUTS).fit(train)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.just(float("nan")), st.just(-0.0), st.just(float("inf")), st.just(float("-inf")),
                          st.floats(-1e100, 1e100).filter(lambda v: v == 0 or abs(v) > 1e-100)), min_size=0, max_size=60))
def test_fit_statistics_match_polars(values):
    "The fast paths of `fit` (O(n) float median, impute+standardize fused into one pass) agree with polars' own answers."
    df = pl.DataFrame({"x": values}, schema={"x": pl.Float64})
    spec = FeatureSpec([{"op": "impute", "column": "x", "strategy": "median"}, {"op": "standardize", "column": "x"}],
                       [{"name": "x", "kind": "number"}]).fit(df)
    median = df.select(pl.col("x").fill_nan(None).median()).item()
    ordered = sorted(v for v in values if v is not None and not math.isnan(v))
    middle = ordered[(len(ordered) - 1) // 2:len(ordered) // 2 + 1]
    if middle and all(map(math.isfinite, middle)):
        # exactly the correctly rounded mean of the middle values; polars' own median can be off by an ulp of them
        assert spec.steps[0]["value"] == exact_median(ordered)
        assert spec.steps[0]["value"] == pytest.approx(median, rel=1e-15, abs=1e-15 * max(map(abs, middle)))
    else: assert spec.steps[0]["value"] == 0.0 and (median is None or not np.isfinite(median))  # no finite statistic: 0.0
    imputed = df.select(pl.col("x").fill_nan(None).fill_null(spec.steps[0]["value"])).to_series().to_list()
    if not imputed or not all(np.isfinite(imputed)): return  # no finite statistic to compare
    mean = statistics.fmean(imputed)  # exact references (Fraction arithmetic), not another float formula
    std = statistics.stdev(imputed) if len(imputed) > 1 else 0.0
    scale = max(abs(v) for v in imputed)
    assert spec.steps[1]["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-12 * scale)
    assert spec.steps[1]["std"] == pytest.approx(std if std > 1e-12 * scale else 1.0, rel=1e-6)


def test_median_of_large_skewed_column():
    "Many values in one radix bucket, nulls and NaN: still the exact median."
    rng = np.random.default_rng(7)
    a = np.concatenate([rng.uniform(1.0, 1.0001, 300_001), rng.standard_cauchy(50_000) * 1e9])
    a[rng.random(len(a)) < 0.1] = np.nan
    df = pl.DataFrame({"x": a}).with_columns(pl.when(pl.int_range(pl.len()) % 97 == 0).then(None).otherwise(pl.col("x")).alias("x"))
    spec = FeatureSpec([{"op": "impute", "column": "x"}], [{"name": "x", "kind": "number"}]).fit(df)
    assert spec.steps[0]["value"] == pytest.approx(df.select(pl.col("x").fill_nan(None).median()).item(), rel=1e-15)


def big_frame(n: int, seed: int) -> pl.DataFrame:
    "A multi-chunk frame with nulls, NaN, infinities, ties, Float32, small and wide integers, Categorical and booleans."
    r = np.random.default_rng(seed)
    x = r.normal(5, 3, n)
    x[r.random(n) < 0.01], x[r.random(n) < 1e-4] = np.nan, np.inf
    cats = np.array(["a", "b", "c", "a-category-longer-than-twelve-bytes"])
    df = pl.DataFrame({"x": x, "n": r.integers(-3, 4, n), "w": r.integers(-10**15, 10**15, n), "f": r.lognormal(0, 2, n).astype(np.float32),
                       "cat": cats[r.integers(0, 4, n)], "flag": r.random(n) < 0.3, "cc": cats[r.integers(0, 3, n)]})
    df = df.with_columns([pl.when(pl.Series(r.random(n) < 0.02)).then(None).otherwise(pl.col(c)).alias(c) for c in ["x", "n", "cat", "flag", "cc"]])
    df = df.with_columns(pl.col("cc").cast(pl.Categorical))
    return pl.concat([df.slice(0, n // 3), df.slice(n // 3)], rechunk=False)


def test_large_frames_match_polars_expressions():
    "Past the sizes the property tests draw: fit's direct statistics (sampled medians and categories) and transform's column jobs (threads, blocks) give polars' answers."
    from mlkit.encoders import expressions
    train, serve = big_frame(300_001, 0), big_frame(150_000, 1)
    inputs = [{"name": "x", "kind": "number"}, {"name": "n", "kind": "number"}, {"name": "w", "kind": "number"}, {"name": "f", "kind": "number"},
              {"name": "cat", "kind": "string"}, {"name": "flag", "kind": "bool"}, {"name": "cc", "kind": "string"}]
    steps = [{"op": "impute", "column": c, "strategy": "median"} for c in ["x", "n", "w", "f"]] + [
        {"op": "standardize", "column": "x"}, {"op": "minmax", "column": "n"}, {"op": "clip", "column": "w", "q_lower": 0.1, "q_upper": 0.9},
        {"op": "standardize", "column": "w"}, {"op": "log", "column": "f"}, {"op": "passthrough", "column": "f"},
        {"op": "one_hot", "column": "cat", "unknown": "bucket"}, {"op": "ordinal", "column": "cat"}, {"op": "passthrough", "column": "flag"},
        {"op": "one_hot", "column": "cc"}, {"op": "impute", "column": "cat", "strategy": "constant", "value": "b"},
        {"op": "one_hot", "column": "cat", "name": "cat_filled", "unknown": "bucket"}]
    spec = FeatureSpec(steps, inputs).fit(train)
    for s, c in zip(spec.steps[:4], ["x", "n", "w", "f"]):
        assert s["value"] == pytest.approx(train.select(pl.col(c).cast(pl.Float64).fill_nan(None).median()).item(), rel=1e-15)
    assert spec.steps[10]["categories"] == train["cat"].drop_nulls().unique().sort().to_list()
    assert spec.steps[13]["categories"] == train["cc"].cast(pl.String).drop_nulls().unique().sort().to_list()
    for df in (train, serve):
        exprs = [e.cast(pl.Float32) for e in expressions(spec, df.schema)]  # every output by polars' expressions
        same(spec.transform(df), df.select(exprs).to_numpy(order="fortran"))


@pytest.mark.parametrize("kind", ["ties", "even_split", "float_ties", "adversarial", "all_nan", "rare_category", "no_category"])
def test_large_column_statistics_are_exact(kind):
    "The sampled median and categories are exact whatever the sample sees: ties counted, a missed bracket or a missed category falls back."
    n, r = 200_003, np.random.default_rng(3)
    if kind == "ties": x = pl.Series("x", r.poisson(3, n))  # a few distinct integers: counted, not selected
    elif kind == "even_split": x = pl.Series("x", r.permutation(np.repeat([1, 2], 100_000)))  # the middle two differ: 1.5
    elif kind == "float_ties": x = pl.Series("x", np.where(r.random(n) < 0.9, 2.5, r.normal(0, 1, n)))
    elif kind == "adversarial": x = pl.Series("x", np.where(np.arange(n) % (n >> 14) == 0, 1e30, r.normal(0, 1, n)))  # the sample sees only 1e30
    elif kind == "all_nan": x = pl.Series("x", np.full(n, np.nan))
    elif kind == "rare_category": x = pl.Series("x", r.choice(["a", "b"], n)).scatter(n // 2 + 1, "rare")  # off the sample's stride
    else: x = pl.Series("x", [None] * n, dtype=pl.String)
    inputs = [{"name": "x", "kind": "string" if kind.endswith("category") else "number"}]
    if kind.endswith("category"):
        spec = FeatureSpec([{"op": "one_hot", "column": "x", "unknown": "bucket"}], inputs).fit(x.to_frame())
        assert spec.steps[0]["categories"] == (["a", "b", "rare"] if kind == "rare_category" else [])
        onehot = [x.eq_missing(c).to_numpy() for c in spec.steps[0]["categories"]] + [np.zeros(n)]  # every value is a category, or missing
        same(spec.transform(x.to_frame()), np.column_stack(onehot).astype(np.float32))
        return
    spec = FeatureSpec([{"op": "impute", "column": "x"}], inputs).fit(x.to_frame())
    v = np.sort(x.cast(pl.Float64).to_numpy())
    v = v[~np.isnan(v)]
    exact = exact_median(v.tolist()) if len(v) else 0.0
    assert spec.steps[0]["value"] == exact


# keyed hashes (pii features): no value of the column in the spec, the same buckets on every path and in every process
HASH_KEY_ENV, HASH_KEY = "MLKIT_TEST_FEATURE_KEY", "a key for the feature tests, 16+ bytes"
HASH_STEPS = [{"op": "hash", "column": "cat", "buckets": 8, "key_env": HASH_KEY_ENV}, {"op": "hash", "column": "n", "key_env": HASH_KEY_ENV},
              {"op": "standardize", "column": "x"}, {"op": "passthrough", "column": "flag"}]
HASH_INPUTS = [{**i, "pii": True} if i["name"] in ("cat", "n") else i for i in INPUTS]


@pytest.fixture(scope="module")
def hash_key_set():
    import os
    old = os.environ.get(HASH_KEY_ENV)
    os.environ[HASH_KEY_ENV] = HASH_KEY
    yield HASH_KEY
    if old is None: del os.environ[HASH_KEY_ENV]
    else: os.environ[HASH_KEY_ENV] = old


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train=frames(min_rows=2), serve=frames(cats=("a", "b", "zz", "", "é\ud7ff")))
def test_hashed_columns_agree_on_every_path(hash_key_set, train, serve):
    "Frames (column jobs), records (no frame), polars' expressions and a spec loaded from JSON: the same buckets, bit for bit."
    from mlkit.encoders import expressions
    from mlkit.features import _transform_values
    spec = FeatureSpec(HASH_STEPS, HASH_INPUTS).fit(train)
    batch = spec.transform(serve)
    same(_transform_values(spec, serve.to_dicts()), batch)
    same(FeatureSpec.from_json(spec.to_json()).transform_records(serve.to_dicts()), batch)
    same(serve.select([e.cast(pl.Float32) for e in expressions(spec, serve.schema)]).to_numpy(order="fortran"), batch)
    hashed = batch[:, :8 + 32]
    assert hashed[:, :8].sum(1).tolist() == [float(v is not None) for v in serve["cat"]]  # one bucket a value, none when missing
    assert hashed[:, 8:].sum(1).tolist() == [float(v is not None) for v in serve["n"]]


def test_a_large_hashed_column_matches_the_records_and_holds_no_value(hash_key_set):
    "Past the parallel and the distinct-value thresholds: mostly distinct values, few distinct values, a Categorical column."
    from mlkit.encoders import PARALLEL_ROWS, hash_codes, key_id
    n = PARALLEL_ROWS + 1001
    emails = pl.Series("e", [f"user{i}@example.org" for i in range(n)])
    for col in (emails, emails.gather(np.arange(n) % 37), emails.gather(np.arange(n) % 37).cast(pl.Categorical)):
        df = pl.DataFrame({"e": col, "x": np.arange(n, dtype=np.float64)})
        spec = FeatureSpec([{"op": "hash", "column": "e", "buckets": 64, "key_env": HASH_KEY_ENV}, {"op": "standardize", "column": "x"}],
                           [{"name": "e", "kind": "string", "pii": True}, {"name": "x", "kind": "number"}]).fit(df)
        X = spec.transform(df)
        codes = hash_codes(col.cast(pl.String).to_list(), spec.steps[0], HASH_KEY.encode())
        same(X[:, :64].argmax(1), codes)
        same(spec.transform_records(df.head(4096).with_columns(pl.col("e").cast(pl.String)).to_dicts()), X[:4096])
        text = spec.to_json()
        assert "example.org" not in text and "user1" not in text and HASH_KEY not in text
        assert spec.steps[0] == {"op": "hash", "column": "e", "buckets": 64, "key_env": HASH_KEY_ENV, "key_id": key_id(HASH_KEY.encode())}
        if col is emails: assert 0.8 < np.bincount(codes, minlength=64).min() / (n / 64)  # distinct values spread evenly (~1% apart here)


def test_hash_buckets_are_stable_across_processes_and_versions(hash_key_set):
    "HMAC-SHA256 of the value's text, first 8 bytes big-endian modulo the buckets: pinned, and the same in a fresh interpreter."
    import subprocess
    import sys
    from mlkit.encoders import hash_codes, key_id
    s = {"buckets": 1000}
    values = ["ann@example.org", 7, 7.0, 7.5, True, None, "Zoë"]
    here = hash_codes(values, s, HASH_KEY.encode()).tolist()
    code = f"from mlkit.encoders import hash_codes; print(hash_codes({values!r}, {{'buckets': 1000}}, {HASH_KEY.encode()!r}).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}).stdout
    assert json.loads(there) == here
    import hmac
    pin = lambda text: int.from_bytes(hmac.digest(HASH_KEY.encode(), text.encode(), "sha256")[:8], "big") % 1000
    assert here == [pin("ann@example.org"), pin("7"), pin("7"), pin("7.5"), pin("1"), -1, pin("Zoë")]
    assert here[0] == 575 and key_id(HASH_KEY.encode()) == "08863d919312"  # pinned: a change here strands every hashed model


def test_a_spec_with_a_hash_step_loads_only_with_its_key(hash_key_set, monkeypatch):
    from mlkit.config import SettingsError
    train = pl.DataFrame({"x": [1.0, 2.0], "n": [1, 2], "cat": ["a", "b"], "flag": [True, False]})
    text = FeatureSpec(HASH_STEPS, HASH_INPUTS).fit(train).to_json()
    assert json.loads(text)["format"] == 2 and json.loads(FeatureSpec(STEPS, INPUTS).fit(train).to_json())["format"] == 1
    monkeypatch.setenv(HASH_KEY_ENV, "another key, also 16 bytes or more")
    with pytest.raises(SettingsError, match=re.escape(f"[features] pii_key_env = {HASH_KEY_ENV}: {HASH_KEY_ENV} is not the key")): FeatureSpec.from_json(text)
    monkeypatch.setenv(HASH_KEY_ENV, "short")
    with pytest.raises(SettingsError, match="holds 5 bytes: the pii feature key needs at least 16"): FeatureSpec.from_json(text)
    monkeypatch.delenv(HASH_KEY_ENV)
    with pytest.raises(SettingsError, match=re.escape(f"[features] pii_key_env = {HASH_KEY_ENV}: set {HASH_KEY_ENV} to a secret")):
        FeatureSpec.from_json(text)
    with pytest.raises(SettingsError, match="set MLKIT_TEST_FEATURE_KEY"): FeatureSpec(HASH_STEPS, HASH_INPUTS).fit(train)  # nor fits without it
    with pytest.raises(ValueError, match="format 3"): FeatureSpec.from_dict({**json.loads(text), "format": 3})


@pytest.mark.parametrize("steps,msg", [
    ([{"op": "one_hot", "column": "cat"}], "column 'cat' is pii: only a hash step may read it"),
    ([{"op": "impute", "column": "n", "strategy": "median"}], "column 'n' is pii"),
    ([{"op": "derive", "name": "d", "expr": "n * 2"}], "reads pii column 'n'"),
    ([{"op": "hash", "column": "cat", "buckets": 1}], "buckets 1: an integer from 2 to 65536"),
    ([{"op": "hash", "column": "cat", "buckets": True}], "buckets True")])
def test_a_pii_input_is_read_by_hash_steps_only(steps, msg):
    with pytest.raises(ValueError, match=re.escape(msg)): FeatureSpec(steps, HASH_INPUTS)


def test_a_hashed_number_column_agrees_with_requests_past_float_precision(hash_key_set):
    "An int column is hashed as the float64 a request's JSON number becomes: a frame of Int64 ids and the same ids served agree."
    ids = pl.Series("id", [1, 7, 2**53 + 1, 4_111_111_111_111_111, None], dtype=pl.Int64)
    spec = FeatureSpec([{"op": "hash", "column": "id", "buckets": 64, "key_env": HASH_KEY_ENV}], [{"name": "id", "kind": "number", "pii": True}]).fit(ids.to_frame())
    same(spec.transform_records([{"id": v} for v in ids.to_list()]), spec.transform(ids.to_frame()))
    same(spec.transform(ids.cast(pl.Float64).to_frame()), spec.transform(ids.to_frame()))
