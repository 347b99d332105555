"""MLflow's pyfunc of an mlkit model, in-process: a pandas DataFrame read by column (this checkout's `pyfunc_model.py`) vs
the record path it replaced (pandas -> a dict per row -> row-by-row checks -> transform).

One penguins bundle (the one `tests/fixtures/pre_split` keeps) is loaded twice with `mlflow.pyfunc.load_model`: as
saved now (`mlflow.pyfunc.save_model` with this checkout's models-from-code file and the contract's signature, as
`mlkit.tracking.log_bundle` logs it), and as a model logged before this change stored it (the fixture's own
`pyfunc_model.py`, which calls `Predictor.predict_frame`: the record path). Both score the same DataFrames of 1, 100
and 10,000 rows (numbers as float64 with missing values, strings with missing values: what MLflow's schema lets
through), in ROUNDS alternating rounds, best of each; MLflow's own schema check is inside both timings. The detail has
the adapters alone (`unwrap_python_model().predict`), without MLflow's check. One torch thread for both.
"""
import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "pre_split" / "mlflow_model"
ROUNDS = int(os.environ.get("MLKIT_BENCH_PYFUNC_ROUNDS", 5))
SECONDS = float(os.environ.get("MLKIT_BENCH_PYFUNC_SECONDS", 0.5))  # per size, model and round
SIZES = [1, 100, 10_000]


def frame(n: int, seed: int = 0):
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    num = lambda mu, sd: np.where(rng.random(n) < 0.05, np.nan, rng.normal(mu, sd, n).round(1))
    return pd.DataFrame({"island": rng.choice(["Biscoe", "Dream", "Torgersen"], n).astype(object),
                         "bill_length_mm": num(44, 5), "bill_depth_mm": num(17, 2), "flipper_length_mm": num(200, 14),
                         "body_mass_g": num(4200, 800), "sex": pd.Series(rng.choice(["female", "male", None], n), dtype=object)})


def rate(f, n: int) -> float:
    "Rows per second of `f()` over about SECONDS."
    f()
    calls, t0 = 0, time.perf_counter()
    while (el := time.perf_counter() - t0) < SECONDS or calls < 3:
        f(); calls += 1
    return n * calls / el


def main(out: Path):
    import mlflow
    import pandas as pd
    import torch

    from mlkit.tracking import contract_signature, pyfunc_code
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        bundle = Path(d) / "bundle"
        shutil.copytree(FIXTURE / "artifacts" / "bundle", bundle)
        sig = contract_signature(json.loads((bundle / "contract.json").read_text()))
        mlflow.pyfunc.save_model(str(Path(d) / "now"), python_model=str(pyfunc_code()), artifacts={"bundle": str(bundle)}, signature=sig)
        now, before = mlflow.pyfunc.load_model(str(Path(d) / "now")), mlflow.pyfunc.load_model(str(FIXTURE))
        frames = {n: frame(n) for n in SIZES}
        for df in frames.values():  # the same answers, or the figures mean nothing
            pd.testing.assert_frame_equal(now.predict(df), before.predict(df), check_exact=True)
        runs = {}
        for _ in range(ROUNDS):
            for n, df in frames.items():
                for label, m in (("now", now), ("before", before)):
                    runs.setdefault((label, n), []).append(rate(lambda m=m, df=df: m.predict(df), n))
                    runs.setdefault((label + " adapter", n), []).append(rate(lambda m=m, df=df: m.unwrap_python_model().predict(None, df), n))
    best = {k: max(v) for k, v in runs.items()}
    limits = {1: 1.5, 100: 1.5, 10_000: 5.0}  # on the adapter, the part mlkit owns; through MLflow's wrapper as information
    figs = []
    for n in SIZES:
        detail = {"rounds": ROUNDS, "seconds_each": SECONDS, "rounds_rows_per_s": {f"{k[0]}": v for k, v in runs.items() if k[1] == n}}
        figs.append({"name": f"mlkit's pyfunc adapter alone, {n:,}-row DataFrame (read by column vs the record path)", "unit": "rows/s",
                     "value": best[("now adapter", n)], "baseline": best[("before adapter", n)],
                     "baseline_label": "record path (the adapter as logged before)",
                     "target": {"of": "ratio", "op": ">=", "limit": limits[n]}, "detail": detail})
        figs.append({"name": f"mlflow.pyfunc predict (MLflow's schema check included), {n:,}-row DataFrame (info)", "unit": "rows/s",
                     "value": best[("now", n)], "baseline": best[("before", n)], "baseline_label": "record path (pyfunc as logged before)",
                     "detail": detail})
    print(json.dumps(figs, indent=1))
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    main(ap.parse_args().out)
