"""Monitoring: `mlkit monitor` against Evidently's DataDriftPreset on the same prediction log, in the same run.

Throughput. A prediction log of 1 M rows (synthetic features, the class a stand-in model gave, version, request ids,
times spread over 24 h) written as lz4 Parquet parts of 5,000 rows, as `PredictionLog` writes them; 100,000 reference
rows (seed 0). Two figures, each run a subprocess of its own after a warm-up on a 1,000-row log, REPEATS runs of each
library alternating, the fastest kept; Evidently runs in its own venv (`.venv-bench`, made by `make bench` from the
`bench` extra; telemetry off by `DO_NOT_TRACK`).
- Compute only (target: mlkit >= 10x Evidently's rows/s): the reference statistics prepared outside the clock for both,
  the log already read. mlkit: `monitor` (the whole day and 24 hourly windows) and the retirement verdict against the
  training profile. Evidently keeps no drift statistics between runs: what it can reuse, the reference `Dataset` (its
  column types and per-column stats), is built outside the clock; timed is `Report([DataDriftPreset()]).run` (the day
  only), no HTML; its drift tests read the reference rows again each run.
- End to end (info): both from the raw reference rows to a written HTML page. mlkit: profile the reference rows, read
  the log, monitor, verdict, HTML. Evidently: read the reference rows and the log's feature and prediction columns, run,
  HTML.
mlkit alone at 10 M rows: what `mlkit monitor` does (read, monitor, HTML; the profile from the bundle): rows/s, and peak
memory (peak RSS during the run minus the RSS before it, the log's read included) against the log's in-memory size.

Verdicts. Live: 10,000 rows; 20 seeds without drift, and each kind of injected drift at the magnitude the tests use and
at a subtler one. mlkit: `monitor` with the default thresholds; it caught a drift when it alerts on the drifted column
alone. Evidently: the preset's defaults (reference over 1,000 rows: normed Wasserstein distance for numbers,
Jensen-Shannon distance for categories, each drifting at >= 0.1; dataset drift when at least half of the columns
drift); it caught a drift when its test on the drifted column fails. Each figure says who caught it ("both", "mlkit
only", "Evidently only", "neither"); a target (the magnitudes the tests use) is met only when mlkit caught it, and the
subtler cases are info, in words.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = int(os.environ.get("MLKIT_BENCH_MONITOR_ROWS", 1_000_000))
BIG_ROWS = int(os.environ.get("MLKIT_BENCH_MONITOR_BIG_ROWS", 10_000_000))
REF_ROWS, LIVE_ROWS, SEEDS, PART_ROWS, REPEATS = 100_000, 10_000, 20, 5_000, 2
FEATURES, LABEL = ["age", "income", "sessions", "score", "region", "plan"], "churned"
COLUMNS = [*FEATURES, "prediction"]  # what Evidently compares: the features and the served class
# name: (synthetic(...) drift arguments, the column it must be blamed on, whether the tests hold mlkit to it)
DRIFTS = {
    "mean shift, age +0.5 sd": ({"mean_shift": {"age": 0.5}}, "age", True),
    "mean shift, age +0.2 sd": ({"mean_shift": {"age": 0.2}}, "age", False),
    "variance change, score sd x1.5": ({"variance_scale": {"score": 1.5}}, "score", True),
    "variance change, score sd x1.2": ({"variance_scale": {"score": 1.2}}, "score", False),
    "new category, 5% of region": ({"new_category": 0.05}, "region", True),
    "new category, 2% of region": ({"new_category": 0.02}, "region", False),
    "missing-rate jump, income 2% -> 20%": ({"missing_rate": {"income": 0.2}}, "income", True),
    "missing-rate jump, income 2% -> 10%": ({"missing_rate": {"income": 0.1}}, "income", False),
    "label shift, churn 36% -> 60%": ({"label_rate": 0.6}, "prediction", True),
}


def evidently_python() -> str:
    "The interpreter that has Evidently: MLKIT_BENCH_EVIDENTLY_PYTHON, else .venv-bench, else this one if it can."
    if os.environ.get("MLKIT_BENCH_EVIDENTLY_PYTHON"): return os.environ["MLKIT_BENCH_EVIDENTLY_PYTHON"]
    bench = REPO / ".venv-bench" / "bin" / "python"
    if bench.exists(): return str(bench)
    if subprocess.run([sys.executable, "-c", "import evidently"], capture_output=True).returncode == 0: return sys.executable
    raise SystemExit("Evidently is not installed: `make bench` makes .venv-bench from the `bench` extra of pyproject.toml")


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    return 0.0


def reset_peak():
    "Reset the peak-RSS mark, so that VmHWM is the peak from now on."
    Path("/proc/self/clear_refs").write_text("5")


# ---- the cases, each run in a subprocess: mlkit's in .venv, Evidently's in .venv-bench (no mlkit, no polars there)

def mlkit_monitor(folder: Path, d: Path) -> dict:
    "What `mlkit monitor churn --html F` does after fetching the bundle (its `profile.json` made at training): read, monitor, page."
    from mlkit.config import load_settings
    from mlkit.monitoring import monitor, retirement, served_log
    from mlkit.reports import render_report
    settings = load_settings(d / "settings.ini", env={})
    profile, contract = (json.loads((d / f).read_text()) for f in ("profile.json", "contract.json"))
    log, _ = served_log(folder, version="1", model="churn")
    rep = {"model": "churn", "version": "1", **monitor(log, profile, contract, settings)}
    rep["retirement"] = retirement(rep, settings)
    (d / "mlkit.html").write_text(render_report(rep))
    return {"rows": len(log), "log_mib": log.estimated_size() / 2**20, "windows": len(rep["windows"]), "alert": rep["alert"]}


def mlkit_case(mode: str, folder: Path, d: Path) -> tuple[float, dict]:
    """(seconds, facts) of one mlkit run. `compute`: `monitor` and the retirement verdict on the log already read, against
    the training profile (made before); `e2e`: the profile made from the raw reference rows (`train.parquet`), the log
    read, monitored, its HTML page written; `command`: `mlkit_monitor` (the profile from the bundle)."""
    from mlkit.config import load_settings
    from mlkit.monitoring import monitor, retirement, served_log
    from mlkit.profiles import profile_frame
    from mlkit.reports import render_report
    settings = load_settings(d / "settings.ini", env={})
    contract = json.loads((d / "contract.json").read_text())
    if mode == "command":
        t0 = time.perf_counter()
        out = mlkit_monitor(folder, d)
        return time.perf_counter() - t0, out
    if mode == "compute":
        profile = json.loads((d / "profile.json").read_text())
        log, _ = served_log(folder, version="1", model="churn")
        t0 = time.perf_counter()
    else:
        import polars as pl
        t0 = time.perf_counter()
        profile = profile_frame(pl.read_parquet(d / "train.parquet"))
        log, _ = served_log(folder, version="1", model="churn")
    rep = {"model": "churn", "version": "1", **monitor(log, profile, contract, settings)}
    rep["retirement"] = retirement(rep, settings)
    if mode == "e2e": (d / "mlkit.html").write_text(render_report(rep))
    return time.perf_counter() - t0, {"rows": len(log), "log_mib": log.estimated_size() / 2**20, "windows": len(rep["windows"]), "alert": rep["alert"]}


def evidently_case(mode: str, folder: Path, d: Path) -> tuple[float, dict]:
    """(seconds, facts) of one Evidently run of `Report([DataDriftPreset()])` on the log's feature and prediction columns.
    `compute`: both frames read, the column types declared (`DataDefinition`, as mlkit's contract declares them) and the
    reference `Dataset` built (its per-column statistics: all Evidently can reuse; its drift tests read the reference rows
    again on every run) before the clock; timed: the current `Dataset` and `run`, no HTML. `e2e`: the reference rows and the log read, `run`, its HTML page written."""
    import evidently
    import pandas as pd
    from evidently import Dataset, DataDefinition, Report
    from evidently.presets import DataDriftPreset
    if mode == "compute":  # the column types declared (as mlkit's contract declares them): no inference in the clock
        types = DataDefinition(numerical_columns=["age", "income", "sessions", "score"], categorical_columns=["region", "plan", "prediction"])
        cur = pd.read_parquet(folder, columns=COLUMNS)
        ref = Dataset.from_pandas(pd.read_parquet(d / "reference.parquet"), data_definition=types)
        t0 = time.perf_counter()
        Report([DataDriftPreset()]).run(current_data=Dataset.from_pandas(cur, data_definition=types), reference_data=ref)
    else:
        t0 = time.perf_counter()
        cur = pd.read_parquet(folder, columns=COLUMNS)
        snap = Report([DataDriftPreset()]).run(current_data=cur, reference_data=pd.read_parquet(d / "reference.parquet"))
        (d / "evidently.html").write_text(snap.get_html_str(as_iframe=False))
    return time.perf_counter() - t0, {"rows": len(cur), "log_mib": cur.memory_usage(deep=True).sum() / 2**20, "version": evidently.__version__}


def timed(lib: str, mode: str, folder: str, d: str) -> dict:
    "One timed run after a warm-up on the small log (code paths faulted in, imports done): seconds and memory."
    work = mlkit_case if lib == "mlkit" else evidently_case
    d = Path(d)
    work(mode, d / "log_warm", d)
    base = rss_mib()
    reset_peak()
    secs, out = work(mode, Path(folder), d)
    return {**out, "seconds": secs, "base_mib": base, "peak_extra_mib": rss_mib("VmHWM") - base}


def mlkit_verdicts(d: str) -> dict:
    "mlkit's verdict on every case of `d/cases`."
    import polars as pl

    from mlkit.config import load_settings
    from mlkit.monitoring import monitor
    d = Path(d)
    settings = load_settings(d / "settings.ini", env={})
    profile, contract = (json.loads((d / f).read_text()) for f in ("profile.json", "contract.json"))
    out = {}
    for p in sorted((d / "cases").glob("*.parquet")):
        rep = monitor(pl.read_parquet(p), profile, contract, settings)
        scores = {c["column"]: c["psi"] for c in rep["columns"]}
        out[p.stem] = {"alert": rep["alert"], "alerts": rep["alerts"], "columns": sorted({a.split(":")[0] for a in rep["alerts"]}),
                       "psi": {**scores, "prediction": rep["classes"]["psi"]},
                       "null_rate": {c["column"]: c["null_rate"] for c in rep["columns"]},
                       "unseen_rate": {c["column"]: c["unseen_rate"] for c in rep["columns"] if c.get("unseen_rate") is not None}}
    return out


def evidently_verdicts(d: str) -> dict:
    "Evidently's DataDriftPreset verdict on every case: the columns its tests flag, their scores, dataset drift."
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset
    d = Path(d)
    ref = pd.read_parquet(d / "reference.parquet")
    out = {}
    for p in sorted((d / "cases").glob("*.parquet")):
        res = Report([DataDriftPreset()], include_tests=True).run(current_data=pd.read_parquet(p, columns=COLUMNS), reference_data=ref).dict()
        drifted, dataset = [], None
        for t in res["tests"]:
            params = t["metric_config"]["params"]
            if params["type"].endswith("ValueDrift") and t["status"] == "FAIL": drifted.append(params["column"])
            if params["type"].endswith("DriftedColumnsCount"): dataset = t["status"] == "FAIL"
        scores = {m["config"]["column"]: (m["config"]["method"], float(m["value"])) for m in res["metrics"]
                  if m["config"]["type"].endswith("ValueDrift")}
        out[p.stem] = {"columns": sorted(drifted), "dataset_drift": dataset, "scores": scores}
    return out


def case(kind: str, args: list[str], out: str):
    if kind in ("evidently", "evidently_verdicts"):
        os.environ["DO_NOT_TRACK"] = "1"  # Evidently's telemetry off (read by evidently.telemetry at import)
    res = {"mlkit": lambda: timed("mlkit", *args), "evidently": lambda: timed("evidently", *args),
           "mlkit_verdicts": lambda: mlkit_verdicts(*args), "evidently_verdicts": lambda: evidently_verdicts(*args)}[kind]()
    Path(out).write_text(json.dumps(res))


def sub(kind: str, *args, python: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "DO_NOT_TRACK": "1"}
        subprocess.run([python or sys.executable, __file__, "--case", kind, f.name, *map(str, args)], check=True, env=env)
        return json.loads(Path(f.name).read_text())


# ---- the data, the runs and the figures (in .venv)

def served(df, hours: float, start=None, ids: str = "r"):
    "`df` as the prediction log holds it (see `PredictionLog`), times spread over `hours` from `start`; the stand-in"
    "model's class is the true one."
    import datetime as dt

    import polars as pl
    i = pl.int_range(pl.len(), dtype=pl.Int64)
    p = pl.col(LABEL).cast(pl.Float64)
    return df.select(
        (pl.lit(start or dt.datetime(2026, 11, 1)) + pl.duration(microseconds=(i * (hours * 3.6e9 / len(df))).cast(pl.Int64))).alias("time"),
        pl.format(f"{ids}-{{}}", i // 10).alias("request_id"), (i % 10).alias("row"), pl.lit("champion").alias("answered_by"),
        pl.lit("churn").alias("model"), pl.lit("1").alias("version"),
        *[pl.col(c).cast(pl.Float64) for c in ["age", "income", "sessions", "score"]], "region", "plan",
        pl.col(LABEL).cast(pl.String).str.to_titlecase().alias("prediction"), (1 - p).alias("p_False"), p.alias("p_True"))


def write_log(folder: Path, n: int, chunk: int = 1_000_000):
    "A prediction log of `n` rows evenly over 24 h, in parts of PART_ROWS, made a million rows at a time."
    import datetime as dt

    from mlkit.data import synthetic
    folder.mkdir(parents=True)
    for c0 in range(0, n, chunk):
        k = min(chunk, n - c0)
        df = served(synthetic(k, seed=1 + c0), hours=24 * k / n, start=dt.datetime(2026, 11, 1) + dt.timedelta(hours=24 * c0 / n), ids=f"r{c0}")
        for p0 in range(0, k, PART_ROWS):
            df.slice(p0, PART_ROWS).write_parquet(folder / f"part-{c0 + p0:020d}.parquet", compression="lz4")


def prepare(d: Path) -> dict:
    "Settings (defaults), the training profile and contract, the reference rows for Evidently, the warm-up log."
    import polars as pl

    from mlkit.contracts import synthetic_contract
    from mlkit.data import synthetic
    from mlkit.profiles import profile_frame
    (d / "settings.ini").write_text("# mlkit's runtime settings: the built-in defaults\n")
    train = synthetic(REF_ROWS, seed=0).select(*FEATURES, LABEL)
    t0 = time.perf_counter()
    profile = profile_frame(train)
    secs = time.perf_counter() - t0
    contract = synthetic_contract().subset(FEATURES).to_dict()
    contract["columns"][LABEL]["categories"] = ["False", "True"]  # the classes the model answers with
    (d / "profile.json").write_text(json.dumps(profile))
    (d / "contract.json").write_text(json.dumps(contract))
    train.write_parquet(d / "train.parquet")  # the raw reference rows each side starts from end to end
    train.select(*FEATURES, pl.col(LABEL).cast(pl.String).str.to_titlecase().alias("prediction")).write_parquet(d / "reference.parquet")
    write_log(d / "log_warm", 1000)
    return {"profile_seconds": secs, "reference_rows": REF_ROWS}


def write_cases(d: Path) -> dict:
    "The verdict cases: SEEDS logs without drift, one per drift kind and magnitude; name -> (kind, column)."
    from mlkit.data import synthetic
    (d / "cases").mkdir()
    names = {}
    for s in range(SEEDS):
        served(synthetic(LIVE_ROWS, seed=1000 + s), hours=1).write_parquet(d / "cases" / f"nodrift-{s:02d}.parquet")
    for k, (name, (kwargs, column, _)) in enumerate(DRIFTS.items()):
        served(synthetic(LIVE_ROWS, seed=2000 + k, **kwargs), hours=1).write_parquet(d / "cases" / f"drift-{k:02d}.parquet")
        names[f"drift-{k:02d}"] = (name, column)
    return names


def best(runs: list[dict]) -> dict:
    "The fastest run, with the largest peak memory of all runs (the conservative pair)."
    return {**min(runs, key=lambda r: r["seconds"]), "peak_extra_mib": max(r["peak_extra_mib"] for r in runs),
            "all_seconds": [r["seconds"] for r in runs]}


def caught(mlkit: bool, evidently: bool) -> str:
    "Which of the two flagged a drift, in words."
    return {(True, True): "both", (True, False): "mlkit only", (False, True): "Evidently only", (False, False): "neither"}[mlkit, evidently]


def show_mlkit(v: dict, column: str) -> str:
    if not v["alert"]: return f"no alert ({column} PSI {v['psi'][column]:.3f})"
    return "alert: " + "; ".join(v["alerts"])


def show_evidently(v: dict, column: str | None) -> str:
    ds = "dataset drift: " + ("yes" if v["dataset_drift"] else "no")
    if v["columns"]: return "drift: " + ", ".join(f"{c} ({v['scores'][c][0]} {v['scores'][c][1]:.3f})" for c in v["columns"]) + f"; {ds}"
    if column is None: return f"no column drifts; {ds}"
    m, s = v["scores"][column]
    return f"no drift ({column} {m} {s:.3f}); {ds}"


def throughput(d: Path, evpy: str, mode: str, label, prep: dict) -> list[dict]:
    "The figures of one mode (`compute` or `e2e`) at ROWS logged rows: REPEATS runs of each library, alternating."
    m_runs, e_runs = [], []
    for _ in range(REPEATS):
        m_runs.append(sub("mlkit", mode, d / "log", d))
        e_runs.append(sub("evidently", mode, d / "log", d, python=evpy))
    m, e = best(m_runs), best(e_runs)
    ev = f"Evidently {e['version']} DataDriftPreset"
    if mode == "compute":
        fig = {"name": f"monitor compute-only throughput, {label(ROWS)} logged rows", "unit": "rows/s", "value": m["rows"] / m["seconds"],
               "baseline": e["rows"] / e["seconds"], "baseline_label": f"{ev}, Report.run only",
               "target": {"of": "ratio", "op": ">=", "limit": 10.0},
               "detail": {"mlkit": m, "evidently": e, **prep, "work": {
                   "mlkit": "monitor() (the whole day and 24 hourly windows: PSI, null rate, unseen share per feature, the prediction's "
                            "class PSI) and the retirement verdict, on the log already read; the reference profile made before",
                   "evidently": "Report([DataDriftPreset()]).run(current, reference): the current DataFrame already read, the reference "
                                "Dataset built before the clock (column types, per-column stats: what it can reuse; its drift tests "
                                "read the 100,000 reference rows again each run); the whole day only, no windows, no HTML"}}}
    else:
        fig = {"name": f"monitor end to end, {label(ROWS)} logged rows (raw reference rows to a written HTML page)", "unit": "rows/s",
               "value": m["rows"] / m["seconds"], "baseline": e["rows"] / e["seconds"], "baseline_label": ev,
               "detail": {"mlkit": m, "evidently": e, "work": {
                   "mlkit": "read the 100,000 reference rows and profile them, read the whole log (all columns), monitor (day + "
                            "24 windows), retirement verdict, render and write the HTML page",
                   "evidently": "read the 100,000 reference rows and the log's feature and prediction columns, Report.run (the "
                                "day), render and write the HTML page"}}}
    mem = {"name": f"monitor peak memory, {mode}, {label(ROWS)} logged rows", "unit": "MiB", "value": m["peak_extra_mib"],
           "baseline": e["peak_extra_mib"], "baseline_label": f"Evidently {e['version']}"}
    print(fig["name"], round(fig["value"]), "vs", round(fig["baseline"]), "rows/s", flush=True)
    return [fig, mem]


def verdicts(d: Path, evpy: str) -> list[dict]:
    "The no-drift seeds and each injected drift: who caught what, in words; a drift Evidently flags and mlkit misses is never shown as met."
    names = write_cases(d)
    mv, ev = sub("mlkit_verdicts", d), sub("evidently_verdicts", d, python=evpy)
    clean = [f"nodrift-{s:02d}" for s in range(SEEDS)]
    m_alarms = [c for c in clean if mv[c]["alert"]]
    e_alarms = [c for c in clean if ev[c]["columns"]]
    e_dataset = [c for c in clean if ev[c]["dataset_drift"]]
    figs = [{"name": f"no drift: false alarms in {SEEDS} seeds x {LIVE_ROWS:,} rows", "unit": "", "value": float(len(m_alarms)),
             "baseline": None, "text": f"{len(m_alarms)} of {SEEDS}",
             "baseline_text": f"{len(e_alarms)} of {SEEDS} with a drifting column, {len(e_dataset)} with dataset drift (Evidently)",
             "target": {"of": "value", "op": "<=", "limit": 1.0},
             "detail": {"mlkit": {c: mv[c]["alerts"] for c in m_alarms}, "evidently": {c: ev[c]["columns"] for c in e_alarms}}}]
    for case_id, (name, column) in names.items():
        mk, evd = mv[case_id], ev[case_id]
        found, e_found = mk["alert"] and mk["columns"] == [column], column in evd["columns"]
        who, must = caught(found, e_found), DRIFTS[name][2]
        # with a target, the figure is met only when mlkit caught it (alone on its column); without one, the words say who did
        figs.append({"name": f"{name}, {LIVE_ROWS:,} rows: " + (f"an alert on {column} alone" if must else "(subtler, info)"),
                     "unit": "", "value": float(found), "baseline": None, "caught": who,
                     "text": f"caught by {who}; mlkit: {show_mlkit(mk, column)}", "baseline_text": show_evidently(evd, column) + " (Evidently)",
                     **({"target": {"of": "value", "op": ">=", "limit": 1.0}} if must else {}),
                     "detail": {"mlkit": mk, "evidently": evd}})
    print("\n".join(f"{f['name']}: mlkit {f['text']} | {f['baseline_text']}" for f in figs), flush=True)
    return figs


def main(out: Path):
    evpy = evidently_python()
    figs = []
    label = lambda n: f"{n // 1_000_000} M" if n >= 1_000_000 else f"{n:,}"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prep = prepare(d)
        write_log(d / "log", ROWS)
        figs += throughput(d, evpy, "compute", label, prep)
        figs += throughput(d, evpy, "e2e", label, prep)
        if BIG_ROWS:
            write_log(d / "log_big", BIG_ROWS)
            b = best([sub("mlkit", "command", d / "log_big", d) for _ in range(REPEATS)])
            figs.append({"name": f"mlkit monitor command, {label(BIG_ROWS)} logged rows (mlkit alone: read, monitor, HTML)", "unit": "rows/s",
                         "value": b["rows"] / b["seconds"], "baseline": None, "detail": b})
            figs.append({"name": f"monitor peak memory, {label(BIG_ROWS)} logged rows (mlkit alone)", "unit": "MiB",
                         "value": b["peak_extra_mib"], "baseline": b["log_mib"], "baseline_label": "the log in memory",
                         "target": {"of": "ratio", "op": "<=", "limit": 3.0}})
            print(figs[-2]["name"], round(figs[-2]["value"]), "rows/s;", round(b["peak_extra_mib"]), "MiB peak for a",
                  round(b["log_mib"]), "MiB log", flush=True)
        figs += verdicts(d, evpy)
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--case", nargs="+", metavar=("KIND OUT", "ARGS"))
    a = ap.parse_args()
    if a.case: case(a.case[0], a.case[2:], a.case[1])
    else: main(a.out)
