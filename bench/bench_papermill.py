"""Papermill overhead: the penguins training notebook through papermill vs the same cells exec'd in a fresh Python.

Both sides start a fresh interpreter (so both pay the same imports), use the same parameters and log to a fresh
MLflow SQLite store. The figure is the papermill wall time; the baseline is the in-process wall time; the overhead
(papermill - in-process, seconds) is the second figure.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "train" / "penguins.ipynb"
PARAMS = {"epochs": 20, "hidden": [16], "batch_size": 32}
ROUNDS = 3


def exec_cells(nb_path: str, params_json: str):
    "Run the notebook's code cells in this interpreter, parameters cell first, then the overrides."
    import nbformat
    nb = nbformat.read(nb_path, as_version=4)
    ns: dict = {"__name__": "__main__"}
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        exec(compile(cell.source, nb_path, "exec"), ns)
        if "parameters" in cell.metadata.get("tags", []): ns.update(json.loads(params_json))


def timed(cmd, env, cwd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(out: Path):
    import os
    bin_ = Path(sys.executable).parent
    pm, inproc = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(ROUNDS):
            root = Path(d) / f"p{i}"
            root.mkdir()
            (root / "settings.ini").write_text(f"[project]\nstate_dir = state\ntrain_dir = {NB.parent}\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLKIT_", "MLFLOW_", "BENTOML_"))}
            env.update(MLKIT_SETTINGS=str(root / "settings.ini"), PATH=f"{bin_}:{env['PATH']}")
            yaml_params = "\n".join(f"{k}: {json.dumps(v)}" for k, v in PARAMS.items())
            pm.append(timed([str(bin_ / "papermill"), str(NB), str(root / "out.ipynb"), "-y", yaml_params,
                             "--no-progress-bar"], env, NB.parent))
            inproc.append(timed([sys.executable, __file__, "--exec", str(NB), json.dumps(PARAMS)], env, NB.parent))
    p, b = statistics.median(pm), statistics.median(inproc)
    figs = [
        {"name": "penguins training via papermill (wall, median of 3)", "unit": "s", "value": p, "baseline": b,
         "baseline_label": "same cells in-process", "target": {"of": "ratio", "op": "<=", "limit": 2.0}},
        {"name": "papermill overhead per run (papermill - in-process)", "unit": "s", "value": p - b, "baseline": None,
         "target": None},
    ]
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--exec", nargs=2, metavar=("NOTEBOOK", "PARAMS_JSON"))
    a = ap.parse_args()
    if a.exec: exec_cells(*a.exec)
    else: main(a.out)
