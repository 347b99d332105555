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
