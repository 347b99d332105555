"""Every HTML page mlkit writes opens offline in headless Chromium: no console error, no request but the file, every section.

The pages are real: the model card of the champion, a monitoring report of logged traffic and the executed training
notebook logged with the run. Chromium is Debian's `chromium`, which `make test` installs; without it these tests fail.
"""
import datetime as dt
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from browser import CHROMIUM, MISSING, Chromium
from conftest import mlkit

OPEN_DETAILS = "document.querySelectorAll('details').forEach(d => d.open = true)"  # the reader unfolds the notebook
# What would load something from elsewhere: a remote src/href, a remote CSS url() or @import, any script at all.
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:[a-z]+:)?//|url\(\s*["']?(?:[a-z]+:)?//|@import|<script\b""", re.I)


def test_chromium_is_installed():
    assert Path(CHROMIUM).exists(), MISSING


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists(): pytest.fail(MISSING, pytrace=False)
    with Chromium() as b: yield b


@contextmanager
def _configured(env: dict):
    "mlkit configured in this process for the test project, as a module-scoped fixture needs it."
    import mlkit.config
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try: yield mlkit.config.configure()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        mlkit.config._configured = None


def _logged_traffic(tmp: Path):
    "Version 1 scores the penguins, then the same birds with 15 mm longer bills, through the service's `PredictionLog`;"
    "the log is spread over four hours two days ago (before any other test's traffic) so that the report has windows."
    "Returns (log frame, labels frame)."
    import polars as pl

    from mlkit.data import load_penguins
    from mlkit.registry import fetched_bundle
    from mlkit.predictor import Predictor
    from mlkit.predlog import PredictionLog, read_prediction_log
    with fetched_bundle("penguins", version="1") as (bundle, mv):
        predictor = Predictor.from_bundle(bundle, "penguins", mv.version)
    data = load_penguins().sample(fraction=1.0, shuffle=True, seed=0)  # served in no particular order
    rows = data.select(predictor.columns).to_dicts()
    longer = [{**r, "bill_length_mm": r["bill_length_mm"] and r["bill_length_mm"] + 15} for r in rows]
    log = PredictionLog(tmp / "log", predictor.contract, flush_seconds=60)
    for rid, batch in (("render-usual", rows), ("render-longer", longer)): log.log(batch, predictor.respond(batch), rid)
    log.close()
    frame = read_prediction_log(tmp / "log").sort(pl.col("request_id") == "render-longer", "row")
    assert frame.height == 2 * len(rows)
    start = dt.datetime.now() - dt.timedelta(days=2)
    frame = frame.with_columns((pl.lit(start) + pl.duration(seconds=pl.int_range(pl.len()) * 20)).cast(frame["time"].dtype).alias("time"))
    truth = data.get_column(predictor.contract["label"]).to_list()
    labels = pl.DataFrame({"request_id": ["render-usual"] * len(rows) + ["render-longer"] * len(rows),
                           "row": [*range(len(rows))] * 2, "label": truth * 2})
    return frame, labels


@pytest.fixture(scope="module")
def pages(trained, tmp_path_factory):
    "The model card of penguins@champion, a monitoring report (with labels) and the training run's notebook page."
    out = tmp_path_factory.mktemp("html")
    env = trained["env"]
    mlkit("models", "promote", "penguins", env=env, check=True)
    with _configured(env) as settings:
        frame, labels = _logged_traffic(out)
        from mlkit.tracking import mlflow
        client = mlflow(settings).MlflowClient()
        html = [f.path for f in client.list_artifacts(trained["run_id"], "notebook") if f.path.endswith(".html")]
        assert html, "the training run logged no notebook HTML"
        notebook = Path(client.download_artifacts(trained["run_id"], html[0], str(out)))
    labels.write_csv(out / "labels.csv")
    part = settings.predictions_dir / "penguins" / "part-99999999999999999998-render.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(part)
    try:  # --log: the card shows this verdict
        since, until = (t.isoformat(timespec="seconds") for t in (frame["time"].min(), frame["time"].max() + dt.timedelta(seconds=1)))
        r = mlkit("monitor", "penguins", "--version", "1", "--labels", out / "labels.csv", "--html", out / "report.html",
                  "--since", since, "--until", until, "--log", env=env)  # this traffic alone: not what other tests served
    finally: part.unlink()  # the session's other tests see only their own traffic
    assert r.returncode == 1 and "bill_length_mm" in r.stdout, r.stdout + r.stderr
    mlkit("models", "card", "penguins@champion", "-o", out / "card.html", env=env, check=True)
    return {"dir": out, "card": out / "card.html", "report": out / "report.html", "notebook": notebook}


def test_the_browser_check_sees_errors_and_foreign_requests(browser, tmp_path):
    "The check below is not vacuous: a console error, an exception, a missing file and a CDN script are all reported."
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><title>bad</title><script src="https://cdn.example.invalid/lib.js"></script>'
                   '<img src="missing.png"><h1>Bad</h1><script>console.error("boom", 42); notDefined();</script>')
    page = browser.open(bad)
    problems = "\n".join(page.problems)
    for seen in ("console.error: boom 42", "ReferenceError: notDefined is not defined", "request for https://cdn.example.invalid/lib.js",
                 "missing.png"):
        assert seen in problems, (seen, problems)
    assert page.dom["h1"] == ["Bad"] and EXTERNAL.search(bad.read_text())


def _open(browser, pages, name: str, **kw):
    "Open one of mlkit's pages: it must load nothing else, log no error, and show what it says."
    html = pages[name].read_text(encoding="utf-8")
    assert not EXTERNAL.search(html), (pages[name], EXTERNAL.search(html))
    page = browser.open(pages[name], **kw)
    assert page.problems == [], f"{pages[name]}:\n" + "\n".join(page.problems)
    assert page.dom["ready"] == "complete" and page.dom["scripts"] == 0
    assert all(i["loaded"] for i in page.dom["images"]), page.dom["images"]
    return page.dom


def test_model_card_renders_every_section(browser, pages):
    dom = _open(browser, pages, "card", before=OPEN_DETAILS)
    assert dom["title"] == "Model card: penguins v1" and dom["h1"] == ["Model card: penguins version 1"]
    assert {"Purpose", "Data", "Metrics", "Metrics per slice", "Gate", "Lineage", "Alias history", "Monitoring",
            "Training parameters and notebook"} <= set(dom["h2"]), dom["h2"]
    assert {"model", "purpose", "data", "metrics", "slices", "gate", "lineage", "history", "monitoring", "training"} <= set(dom["ids"])
    assert "island" in dom["h3"] and dom["tables"] >= 6
    text = dom["text"]
    for shown in ("test_accuracy", "beats_champion", "Latest monitoring run", "ALERT", "sha256:", "epochs",
                  "The executed training notebook", "model_name = "):  # the last: the unfolded notebook's code
        assert shown in text, shown
    html = pages["card"].read_text(encoding="utf-8")
    assert "\x1b" not in html and "[33m" not in text  # no terminal colour codes
    history = html.split('id="history"')[1].split("<h2")[0]
    assert ">None<" not in history and '<td class="t">' in history and not re.search(r":\d\d\.\d", history)  # empty, unwrapped, to the second
    metrics = html.split('id="metrics"')[1].split('id="lineage"')[0]
    assert "test_accuracy" in metrics and not re.search(r">[^<]*\d\.\d{6,}[^<]*<", metrics)  # shown rounded (whole in the tooltip)
    assert "<h4>Train the penguins classifier</h4>" in html  # markdown rendered, below the card's own headings
    assert '<details class="stderr">' in html and all("UserWarning" not in part.split("</details>")[-1]  # warnings folded away
                                                      for part in html.split('<details class="stderr">')[1:])


def test_monitoring_report_renders_plots_windows_and_verdict(browser, pages):
    dom = _open(browser, pages, "report")
    assert dom["title"] == "mlkit monitoring: penguins" and dom["h1"] == ["Monitoring: penguins version 1"]
    assert {"Reference (grey) vs live (blue)", "Drift over time", "Live performance"} <= set(dom["h2"]), dom["h2"]
    assert {"verdict", "features", "windows"} <= set(dom["ids"])
    features = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex"]
    assert dom["svgs"] >= len(features) + 1 and dom["svg_rects"] > 0  # one plot per feature, and the predicted classes
    text = dom["text"]
    assert "ALERT: bill_length_mm: PSI" in text and "accuracy" in text
    assert "reference (training data)" in text and "live (served)" in text  # the legend
    html = pages["report"].read_text(encoding="utf-8")
    assert re.search(r"<text[^>]*>Biscoe</text>", html) and re.search(r"<text[^>]*>Adelie</text>", html)  # bins are named
    assert "{'" not in text and not re.search(r"\d\.\d{8,}", text) and not re.search(r":\d\d\.\d", text)  # no dict repr, rounded
    windows = html.split('id="windows"')[1].split("</table>")[0]
    assert windows.count("<tr") - 1 == text.count("not judged (< 500 rows)") >= 4 and ">ok<" not in windows  # < 500 rows each
    assert all(f"PSI {c}" in text for c in features)  # the windows table's columns
    assert dom["table_rows"] >= 2 + len(features) + 1 + 4  # header + features + classes, header + four windows


def test_training_notebook_page_renders_cells_and_outputs(browser, pages):
    dom = _open(browser, pages, "notebook")
    assert any(h.startswith("Train the penguins classifier") for h in dom["h1"]), dom["h1"]
    for section in ("Data: contract check", "Train, tracked", "Judge on the held-out rows, bundle, log, register"):
        assert any(h.startswith(section) for h in dom["h2"]), (section, dom["h2"])
    assert dom["code_cells"] >= 6 and "epochs = 3" in dom["text"]  # papermill's injected parameters are shown


def test_notebook_markdown_in_a_card_stays_inert(browser, tmp_path):
    "A training notebook whose markdown holds a script, an event handler and a remote image: the card runs and loads none."
    from mlkit.reports import render_card
    hostile = ["# Notes\n", "<script>console.error('ran')</script>\n\n", "<img src=x onerror=\"console.error('handler')\">\n\n",
               "![remote](https://example.invalid/i.png) [link](javascript:console.error('link'))\n"]
    nb = {"cells": [{"cell_type": "markdown", "source": hostile},
                    {"cell_type": "code", "source": ["x"], "outputs": [{"output_type": "stream", "name": "stderr", "text": ["\x1b[33mwarn\x1b[0m\n"]}]}]}
    card = {"name": "m", "version": "1", "aliases": [], "owner": "", "purpose": "", "run_id": "r", "dataset_version": "", "params": {},
            "metrics": {}, "slices": None, "contract": {}, "checks": [], "gate": None, "lineage": [], "history": [], "notebook": nb,
            "monitoring": None}
    path = tmp_path / "card.html"
    path.write_text(render_card(card), encoding="utf-8")
    assert not EXTERNAL.search(path.read_text())
    page = browser.open(path, before=OPEN_DETAILS)
    assert page.problems == [] and page.dom["scripts"] == 0 and page.dom["images"] == [], page.problems
    assert "<script>console.error('ran')</script>" in page.dom["text"] and "\x1b" not in page.dom["text"]  # shown as text
