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
