"""mlkit benchmark harness: each bench_*.py runs in its own subprocess and reports figures with a same-run baseline.

    python bench/run.py [NAME ...]      # default: every bench/bench_*.py; NAMEs replace only their areas in the report

A benchmark prints nothing required; it writes a JSON list of figures to the path given by --out:
    {"name", "unit", "value", "baseline", "baseline_label", "target": {"of": "value"|"ratio", "op": "<="|">=", "limit"}}
and optionally "text" / "baseline_text" (a verdict in words, shown in the report instead of the numbers) and "detail".
The harness adds ratio = value / baseline and ok, writes bench/reports/latest.{json,md}, and exits 1 when a target is
missed or a benchmark fails.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORTS = HERE / "reports"


def machine() -> dict:
    "Cores, memory, GPU and the versions that matter, for the report."
    from importlib.metadata import PackageNotFoundError, version
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError: gpu = None
    vers = {}
    for p in ["mlkit", "torch", "polars", "mlflow", "bentoml", "papermill", "nbdev"]:
        try: vers[p] = version(p)
        except PackageNotFoundError: vers[p] = None
    for env, pkgs in (("MLKIT_BENCH_LITSERVE_PYTHON", ["litserve"]), ("MLKIT_BENCH_EVIDENTLY_PYTHON", ["evidently", "pandas"])):
        vers.update(peer_versions(os.environ.get(env), pkgs))
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "memory_mib": mem, "gpu": gpu,
            "cpu": cpu_model() or platform.machine(), "python": platform.python_version(), "versions": vers}


def cpu_model() -> str | None:
    "The CPU's model name (platform.processor() is empty on Linux)."
    info = Path("/proc/cpuinfo")
    return next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")), None) \
        if info.exists() else None


def peer_versions(python: str | None, pkgs: list[str]) -> dict:
    "The versions of a peer's packages in its own venv (`{pkg}_peer`), or nothing when that venv is not given."
    if not python or not Path(python).exists(): return {}
    code = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in %r}))" % (pkgs,)
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return {f"{k} (peer venv)": v for k, v in json.loads(r.stdout).items()} if r.returncode == 0 else {}


def check(fig: dict) -> dict:
    "Add ratio and ok to a figure."
    base = fig.get("baseline")
    fig["ratio"] = fig["value"] / base if base else None
    t = fig.get("target")
    if t:
        got = fig["ratio"] if t["of"] == "ratio" else fig["value"]
        fig["ok"] = got is not None and (got <= t["limit"] if t["op"] == "<=" else got >= t["limit"])
    else: fig["ok"] = True
    return fig


def run_one(path: Path, timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "figures.json"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(path), "--out", str(out)], capture_output=True, text=True, timeout=timeout)
        secs = time.perf_counter() - t0
        if r.returncode != 0 or not out.exists():
            return [{"bench": path.stem, "name": f"{path.stem} FAILED (exit {r.returncode})", "unit": "", "value": float("nan"),
                     "baseline": None, "ok": False, "error": (r.stderr or r.stdout)[-2000:], "seconds": secs}]
        return [check({"bench": path.stem, "seconds": secs, **f}) for f in json.loads(out.read_text())]


def fmt(x, unit=""):
    if x is None: return "-"
    if isinstance(x, float): return f"{x:,.3g} {unit}".strip() if abs(x) < 1000 else f"{x:,.0f} {unit}".strip()
    return f"{x} {unit}".strip()


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# mlkit benchmark report ({report['when']})", "",
             f"Machine: {m['cores']} cores ({m['usable_cores']} usable), {m['memory_mib']} MiB, "
             f"GPU: {m['gpu'] or 'none'}, Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), "",
             "| figure | value | baseline | ratio | target | ok |", "|---|---|---|---|---|---|"]
    for f in report["figures"]:
        t = f.get("target")
        tgt = f"{t['of']} {t['op']} {t['limit']}" if t else "-"
        base = f"{fmt(f.get('baseline'), f['unit'])} ({f.get('baseline_label', '')})" if f.get("baseline") is not None else "-"
        base = f.get("baseline_text", base).replace("|", "\\|")  # a verdict in words: text / baseline_text
        value = f.get("text", fmt(f["value"], f["unit"])).replace("|", "\\|")
        ratio = f"{f['ratio']:.2f}x" if f.get("ratio") is not None else "-"
        ok = ("yes" if f["ok"] else "**MISSED**") if t or not f["ok"] else "info"  # no target: information, not a verdict
        lines.append(f"| {f['name']} | {value} | {base} | {ratio} | {tgt} | {ok} |")
    areas = report.get("areas") or {}
    if areas:
        total = sum(a["seconds"] or 0 for a in areas.values())
        lines += ["", "Areas (each ran as one subprocess; its ratios come from that run): "
                  + ", ".join(f"{k.removeprefix('bench_')} {(a['seconds'] or 0) / 60:.1f} min at {a['when']}" for k, a in areas.items())
                  + f"; {total / 60:.1f} min in all."]
    rounds = [(f["name"], r) for f in report["figures"] if (r := every_round(f))]
    if rounds:
        lines += ["", "Every round (the figure above is the median round; value / peer per round):", ""]
        lines += [f"- {name}: {r}" for name, r in rounds]
    return "\n".join(lines) + "\n"


def every_round(f: dict) -> str | None:
    "A figure's rounds in words, when its detail carries them (`detail.mlkit.rounds` / `detail.peer.rounds`)."
    d = f.get("detail") or {}
    key = d.get("round_key") or {"req/s": "rps", "rows/s": "rows_per_s", "images/s": "rows_per_s", "ms": "p99_ms"}.get(f.get("unit"), "rps")
    mine, theirs = (d.get(k) or {} for k in ("mlkit", "peer"))
    if not isinstance(mine, dict) or not mine.get("rounds"): return None
    pick = lambda r: r.get(key, r.get("rps"))
    ours = [pick(r) for r in mine["rounds"]]
    peer = [pick(r) for r in theirs.get("rounds", [])] if isinstance(theirs, dict) else []
    show = lambda xs: "/".join(fmt(x) for x in xs if x is not None)
    return f"{show(ours)}" + (f" vs {show(peer)}" if peer else "")


README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(md: str):
    "Replace the README's table between the bench markers with this run's report (without its title line)."
    text = README.read_text()
    if START not in text or END not in text: return
    body = md.split("\n", 2)[2].strip()
    head, rest = text.split(START, 1)
    new = f"{head}{START}\n{md.splitlines()[0].removeprefix('# ')}\n\n{body}\n{END}{rest.split(END, 1)[1]}"
    tmp = README.with_name(".README.md.tmp")
    tmp.write_text(new)
    tmp.replace(README)


def merged(previous: dict | None, report: dict, names: list[str]) -> dict:
    """`make bench AREA=...` replaces those areas' figures in the last report and keeps the others (each area says when
    it ran, on which machine); a run of every area replaces the whole report."""
    if not previous or previous.get("machine", {}).get("cpu") != report["machine"]["cpu"]: return report
    ran = {f"bench_{n}" for n in names}
    kept = [f for f in previous.get("figures", []) if f.get("bench") not in ran]
    areas = {k: v for k, v in previous.get("areas", {}).items() if k not in ran}
    return {**report, "figures": kept + report["figures"], "areas": {**areas, **report["areas"]}}


def main(argv: list[str]) -> int:
    every = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    names = argv or every
    figures, areas = [], {}
    for n in names:
        path = HERE / f"bench_{n}.py"
        print(f"bench {n} ...", flush=True)
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        got = run_one(path, timeout=float(os.environ.get("MLKIT_BENCH_TIMEOUT", 3000)))
        areas[path.stem] = {"when": when, "seconds": got[0].get("seconds") if got else None}
        figures += got
    report = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "figures": figures, "areas": areas}
    REPORTS.mkdir(exist_ok=True)
    last = REPORTS / "latest.json"
    report = merged(json.loads(last.read_text()) if argv and last.exists() else None, report, names)
    md = markdown(report)
    for suffix, text in (("json", json.dumps(report, indent=1)), ("md", md)):
        tmp = REPORTS / f".latest.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(REPORTS / f"latest.{suffix}")
    print(md)
    if {f"bench_{n}" for n in every} <= set(report["areas"]): update_readme(md)  # every area in the report: the README shows it
    missed = [f["name"] for f in figures if not f["ok"]]
    if missed: print(f"targets missed or benchmarks failed: {missed}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
