"""The benchmark harness: ratios, targets, failures flagged, reports written."""
import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_ratio_and_targets():
    ok = bench.check({"name": "a", "unit": "s", "value": 3.0, "baseline": 2.0, "target": {"of": "ratio", "op": "<=", "limit": 2.0}})
    assert ok["ratio"] == 1.5 and ok["ok"]
    slow = bench.check({"name": "b", "unit": "rps", "value": 80.0, "baseline": 100.0, "target": {"of": "ratio", "op": ">=", "limit": 0.9}})
    assert not slow["ok"]
    md = bench.markdown({"when": "now", "machine": bench.machine(), "figures": [ok, slow]})
    assert "| b | 80 rps | 100 rps () | 0.80x | ratio >= 0.9 | **MISSED** |" in md
    assert f"{bench.machine()['cores']} cores" in md


def test_a_failing_benchmark_is_flagged(tmp_path):
    good, bad = tmp_path / "bench_good.py", tmp_path / "bench_bad.py"
    good.write_text("import json, sys\nopen(sys.argv[2], 'w').write(json.dumps([{'name': 'g', 'unit': 's', 'value': 1.0, "
                    "'baseline': 1.0, 'target': {'of': 'ratio', 'op': '<=', 'limit': 1.1}}]))\n")
    bad.write_text("raise SystemExit('boom')\n")
    (fig,) = bench.run_one(good, timeout=60)
    assert fig["ok"] and fig["ratio"] == 1.0
    (fail,) = bench.run_one(bad, timeout=60)
    assert not fail["ok"] and "boom" in fail["error"]


def test_verdicts_are_shown_in_words():
    "A figure may carry `text` / `baseline_text` (a verdict): the report shows them, a `|` in them escaped."
    fig = bench.check({"name": "mean shift", "unit": "", "value": 1.0, "baseline": None, "text": "alert: age: PSI 0.22 > 0.1",
                       "baseline_text": "drift: age | dataset drift: no", "target": {"of": "value", "op": ">=", "limit": 1.0}})
    md = bench.markdown({"when": "now", "machine": bench.machine(), "figures": [fig]})
    assert "| mean shift | alert: age: PSI 0.22 > 0.1 | drift: age \\| dataset drift: no | - | value >= 1.0 | yes |" in md


def test_the_monitoring_bench_log_is_a_prediction_log(tmp_path):
    "The monitoring benchmark times a log shaped as `PredictionLog` writes it: same columns, same types."
    import json

    import numpy as np

    from mlkit.predlog import PredictionLog, read_prediction_log
    spec = importlib.util.spec_from_file_location("bench_monitoring", REPO / "bench" / "bench_monitoring.py")
    mon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mon)
    mon.prepare(tmp_path)
    contract = json.loads((tmp_path / "contract.json").read_text())
    real = PredictionLog(tmp_path / "real", contract, flush_rows=1)
    rows = [{"age": 40, "income": 1000.0, "sessions": 3, "score": 0.5, "region": "north", "plan": None}]
    real.log(rows, {"model": "churn", "version": "1"}, "req-1", proba=np.array([[0.25, 0.75]]), labels=["True"])
    real.close()
    logged = read_prediction_log(tmp_path / "real")
    written = read_prediction_log(tmp_path / "log_warm")
    assert written.schema == logged.schema
    assert len(written) == 1000 and len(list((tmp_path / "log_warm").glob("part-*.parquet"))) == 1
    assert mon.mlkit_monitor(tmp_path / "log_warm", tmp_path)["alert"] is False


def test_the_data_bench_does_equal_work(tmp_path):
    "The pandas baseline computes what mlkit computes: the same matrix, deciles, bin shares, frequencies and check counts."
    import numpy as np
    import pandas as pd
    import polars as pl

    from mlkit.contracts import synthetic_contract, validate
    from mlkit.data import synthetic
    from mlkit.features import FeatureSpec
    from mlkit.profiles import profile_frame
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "bench" / "bench_data.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    synthetic(70_000, seed=3, new_category=0.01).with_columns(id=pl.col("id") % 69_990).write_parquet(tmp_path / "d.parquet")
    df, pdf = pl.read_parquet(tmp_path / "d.parquet"), pd.read_parquet(tmp_path / "d.parquet")
    X = FeatureSpec.from_contract(synthetic_contract(), bd.NUMS + bd.CATS).fit(df).transform(df)
    np.testing.assert_array_equal(X, bd._pd_transform(pdf, bd._pd_fit(pdf)))
    prof = profile_frame(df)["columns"]
    for c in ["id", *bd.NUMS]:
        got = bd._pd_number(pdf, c)
        assert got["quantiles"] == list(prof[c]["quantiles"].values()) and list(got["shares"]) == prof[c]["bins"]["shares"]
        assert abs(got["mean"] - prof[c]["mean"]) <= 1e-9 * abs(prof[c]["mean"]) and got["null_rate"] == prof[c]["null_rate"]
    for c in [*bd.CATS, "churned"]:
        assert {str(k): v for k, v in bd._pd_category(pdf, c)["frequencies"].items()} == prof[c]["frequencies"]
    failing = {(f.column, f.check): f.failing for f in validate(df, synthetic_contract()).failures}
    assert bd._pd_checks()["id"](pdf)[2] == 10 and failing[("id", "unique")] == 20  # (failing, mlkit then counts the rows involved)
    assert failing[("region", "categories")] == bd._pd_checks()["region"](pdf)[2] > 0


def test_an_area_run_replaces_only_its_areas():
    "`make bench AREA=x` keeps the other areas' figures of the last report (same machine) and says when each area ran."
    m = bench.machine()
    old = {"machine": m, "figures": [{"bench": "bench_a", "name": "a1"}, {"bench": "bench_b", "name": "b1"}],
           "areas": {"bench_a": {"when": "t0", "seconds": 60.0}, "bench_b": {"when": "t0", "seconds": 120.0}}}
    new = {"machine": m, "figures": [{"bench": "bench_b", "name": "b2"}], "areas": {"bench_b": {"when": "t1", "seconds": 30.0}}}
    got = bench.merged(old, new, ["b"])
    assert [f["name"] for f in got["figures"]] == ["a1", "b2"]
    assert got["areas"] == {"bench_a": {"when": "t0", "seconds": 60.0}, "bench_b": {"when": "t1", "seconds": 30.0}}
    other = bench.merged({**old, "machine": {**m, "cpu": "another CPU"}}, new, ["b"])  # another machine: nothing kept
    assert [f["name"] for f in other["figures"]] == ["b2"]


def test_info_rounds_and_area_times_in_the_report():
    "A figure without a target reads `info`, not `yes`; every round is listed; each area's time and the total are shown."
    info = bench.check({"bench": "bench_s", "seconds": 90.0, "name": "caught by Evidently only", "unit": "", "value": 0.0, "baseline": None})
    tput = bench.check({"bench": "bench_s", "seconds": 90.0, "name": "tput", "unit": "req/s", "value": 200.0, "baseline": 100.0,
                        "target": {"of": "ratio", "op": ">=", "limit": 1.5},
                        "detail": {"mlkit": {"rounds": [{"rps": 190.0}, {"rps": 200.0}, {"rps": 210.0}]},
                                   "peer": {"rounds": [{"rps": 90.0}, {"rps": 100.0}, {"rps": 110.0}]}}})
    md = bench.markdown({"when": "now", "machine": bench.machine(), "figures": [info, tput],
                         "areas": {"bench_s": {"when": "now", "seconds": 90.0}}})
    assert "| caught by Evidently only | 0 | - | - | - | info |" in md
    assert "- tput: 190/200/210 vs 90/100/110" in md
    assert "s 1.5 min at now; 1.5 min in all." in md
