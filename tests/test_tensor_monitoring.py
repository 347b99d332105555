"""Monitoring of an image field end to end on real images (scikit-learn's 8x8 digits, shipped in its wheel): the field
fitted on training images, its reference from `tensor_profile`, served rows written by a real `PredictionLog` (summaries,
never pixels), read back and judged by `monitor` with the default PSI threshold. A clean held-out sample raises nothing;
a brightened and a noisy one are flagged, each on the summary columns its change moves."""
import importlib.util
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mlkit.config import load_settings
from mlkit.monitoring import compared_features, monitor, report_text
from mlkit.predlog import PredictionLog, read_prediction_log
from mlkit.profiles import profile_frame, tensor_profile
from mlkit.reports import render_report
from mlkit.tensors import TensorSpec

_SKLEARN = importlib.util.find_spec("sklearn")
DIGITS = Path(_SKLEARN.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if _SKLEARN else None
pytestmark = pytest.mark.skipif(not (DIGITS and DIGITS.exists()), reason="scikit-learn's digits.csv.gz is not installed")

TRAIN, REQUEST_ROWS = 1200, 50
CLASSES = [str(i) for i in range(10)]
CONTRACT = {"name": "digits", "label": "digit",
            "columns": {"image": {"dtype": "image", "size": [8, 8], "channels": 1},
                        "digit": {"dtype": "string", "categories": CLASSES}}}
SUMMARY = ["image.mean.0", "image.std.0", "image.hist"]


@pytest.fixture(scope="module")
def digits():
    "The 1,797 digits as 8x8 pixel arrays 0..255 (shuffled once, fixed seed) and their labels."
    raw = np.loadtxt(DIGITS, delimiter=",")
    order = np.random.default_rng(0).permutation(len(raw))
    return np.rint(raw[order, :64] * 255 / 16).reshape(-1, 8, 8), raw[order, 64].astype(int).astype(str)


@pytest.fixture(scope="module")
def trained(digits):
    "The field fitted on the training images, and the training profile: the field's summary and the labels."
    images, labels = digits
    train = list(images[:TRAIN])
    spec = TensorSpec.from_contract(CONTRACT).fit({"image": train})
    profile = {"format": 1, "rows": TRAIN, "columns": {**tensor_profile(spec, {"image": train}),
                                                       **profile_frame(pl.DataFrame({"digit": labels[:TRAIN]}))["columns"]}}
    return spec, profile


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    "Default thresholds (PSI 0.1), with min_rows low enough to judge a ~600-row sample."
    ini = tmp_path_factory.mktemp("settings") / "settings.ini"
    ini.write_text("[project]\nstate_dir = state\n[monitor]\nmin_rows = 200\n")
    return load_settings(ini, env={})


def served(folder: Path, spec: TensorSpec, images: np.ndarray, labels: np.ndarray) -> pl.DataFrame:
    "Serve `images` through a real prediction log (requests of 50 rows; half decoded as validation leaves them, half raw JSON)."
    log, field = PredictionLog(folder, CONTRACT, flush_seconds=0.05, tensors=spec), spec.fields[0]
    for k, start in enumerate(range(0, len(images), REQUEST_ROWS)):
        chunk, truth = images[start:start + REQUEST_ROWS], list(labels[start:start + REQUEST_ROWS])
        rows = [{"image": field.decode(x) if k % 2 else x.tolist()} for x in chunk]
        proba = np.eye(len(CLASSES))[[CLASSES.index(t) for t in truth]]  # a perfect stand-in model
        log.log(rows, {"model": "digits", "version": "1"}, f"req-{k}", proba=proba, labels=truth)
    log.close()
    return read_prediction_log(folder)


def brightened(images: np.ndarray) -> np.ndarray: return np.rint(np.clip(images * 1.1, 0, 255))


def noisy(images: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(images + np.random.default_rng(1).normal(0, 0.05 * 255, images.shape), 0, 255))


def flagged(rep: dict, limit: float) -> set[str]: return {d["column"] for d in rep["columns"] if d["psi"] is not None and d["psi"] > limit}


def test_the_reference_profiles_the_field_summary(trained):
    spec, profile = trained
    assert spec.fields[0].range == [0.0, 255.0]
    assert compared_features(CONTRACT, profile) == SUMMARY
    hist = profile["columns"]["image.hist"]
    assert (hist["kind"], hist["dtype"], hist["null_rate"], hist["range"], len(hist["shares"])) == ("histogram", "hist", 0.0, [0.0, 255.0], 16)
    assert abs(sum(hist["shares"]) - 1) < 1e-9 and hist["shares"][0] > 0.4  # digits are mostly background
    assert all(profile["columns"][c]["kind"] == "number" and len(profile["columns"][c]["bins"]["shares"]) == 10 for c in SUMMARY[:2])


@pytest.mark.parametrize("variant, expected", [  # PSI measured (mean, std, hist): clean < 0.03 each,
    ("clean", set()),
    ("brightened", {"image.mean.0", "image.std.0", "image.hist"}),  # 0.49, 1.0, 0.23: every pixel brighter, and further apart
    ("noisy", {"image.mean.0", "image.std.0"}),  # 0.13, 0.22, 0.06: noise clipped at 0 lifts the dark background a little
])
def test_image_drift_is_found_on_the_columns_it_moves(tmp_path, digits, trained, settings, variant, expected):
    spec, profile = trained
    images, labels = digits[0][TRAIN:], digits[1][TRAIN:]
    images = {"clean": images, "brightened": brightened(images), "noisy": noisy(images)}[variant]
    log = served(tmp_path, spec, images, labels)
    assert len(log) == len(images) == 597
    assert "image" not in log.columns and not any(log[c].dtype == pl.List(pl.Float64) and c != "image.hist" for c in log.columns)
    assert log["image.hist"].list.len().unique().to_list() == [16] and log["image.shape"].unique().to_list() == ["1x8x8"]
    assert not any(f.suffix != ".parquet" for f in tmp_path.iterdir())  # no pixels anywhere but summaries in parts
    rep = monitor(log, profile, CONTRACT, settings)
    psis = {d["column"]: round(d["psi"], 3) for d in rep["columns"]}
    assert [d["column"] for d in rep["columns"]] == SUMMARY and rep["judged"], psis
    assert rep["classes"]["psi"] < 0.1, rep["classes"]["psi"]  # the labels did not move
    assert flagged(rep, rep["thresholds"]["psi"]) == expected, psis
    assert rep["alert"] == bool(expected) and all(a.split(":")[0] in expected for a in rep["alerts"]), rep["alerts"]
    if not expected: assert max(psis.values()) < 0.05, psis
    rep = {"model": "digits", "version": "1", **rep, "retirement": {"retire": False, "reasons": []}}
    hist_line = next(line for line in report_text(rep).splitlines() if line.strip().startswith("image.hist"))
    assert hist_line.split()[1:3] == ["PSI", f"{psis['image.hist']:.3f}"] and "16-bin histogram" in hist_line, hist_line
    html = render_report(rep)
    assert "image.hist" in html and f"{psis['image.hist']:.3f}" in html
