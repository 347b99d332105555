"""What mlkit patches of other packages is checked, and what earlier releases of mlkit wrote still works.

`mlkit._compat` guards each patch by the versions it was checked on; these tests fail when a patched target is gone or
changed shape, when pyproject's caps drift from those versions, and when a model logged before the library was split
(its stored `pyfunc_model.py` imports `mlkit.serving.Predictor`) no longer loads and scores the same.
"""
import importlib
import json
import re
import tomllib
import warnings
from pathlib import Path

import pytest
from conftest import REPO

from mlkit import _compat

FIXTURE = Path(__file__).parent / "fixtures" / "pre_split"


def test_every_patched_target_is_there_with_the_shape_the_patch_expects():
    assert _compat.check_targets() == []


def test_a_changed_target_is_found(monkeypatch):
    telemetry = importlib.import_module("bentoml._internal.utils.telemetry")
    monkeypatch.delattr(telemetry, "ParentBasedTraceIdRatio")
    from bentoml._internal.marshal import dispatcher
    class Changed:  # a CorkDispatcher without the keywords mlkit passes
        def __init__(self, max_latency_in_ms, max_batch_size): pass
    monkeypatch.setattr(dispatcher, "CorkDispatcher", Changed)
    probs = _compat.check_targets()
    assert any("ParentBasedTraceIdRatio is gone" in p for p in probs) and any("CorkDispatcher.__init__ changed" in p for p in probs), probs


@pytest.mark.parametrize("dist,version", [("bentoml", "1.5.0"), ("bentoml", "1.4.39"), ("mlflow", "3.18.0"), ("kantoku", "0.19.0"),
                                          ("opentelemetry-instrumentation-asgi", "0.67b0")])
def test_a_version_outside_the_checked_range_fails_loudly(monkeypatch, dist, version):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: version if d == dist else real(d))
    with pytest.raises(_compat.CompatError, match=re.escape(f"{version} is installed")):
        _compat.require(*_compat.CHECKED)
    if dist == "bentoml":  # and the patches refuse to apply
        with pytest.raises(_compat.CompatError): _compat.cork_dispatcher()


def test_pyproject_caps_each_patched_package_to_the_checked_versions():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {re.match(r"[\w\-.]+", d).group(0).lower(): d for d in deps}
    for dist, (lo, hi) in _compat.CHECKED.items():
        assert dist in specs, f"pyproject.toml does not declare {dist}, whose internals mlkit patches"
        assert re.sub(r"\s", "", specs[dist]) == f"{dist}>={lo},<{hi}", (specs[dist], lo, hi)


def test_a_model_logged_before_the_split_loads_and_scores_the_same():
    import mlflow
    import numpy as np
    import pandas as pd
    assert "from mlkit.serving import Predictor" in (FIXTURE / "mlflow_model" / "pyfunc_model.py").read_text()  # the old import
    with pytest.warns(DeprecationWarning, match="mlkit.serving.Predictor moved to mlkit.predictor.Predictor"):  # the old path, taken
        model = mlflow.pyfunc.load_model(str(FIXTURE / "mlflow_model"))
    example = pd.read_json(FIXTURE / "mlflow_model" / "input_example.json", orient="split")
    example = example.astype({c: "float64" for c in ["bill_depth_mm", "bill_length_mm", "body_mass_g", "flipper_length_mm"]})
    got, expected = model.predict(example), json.loads((FIXTURE / "expected_predictions.json").read_text())
    assert got["label"].tolist() == expected["label"]
    for c in ("p_Adelie", "p_Chinstrap", "p_Gentoo"): np.testing.assert_allclose(got[c].to_numpy(), expected[c], rtol=1e-6)


@pytest.mark.parametrize("old,new", [
    ("mlkit.serving:Predictor", "mlkit.predictor:Predictor"), ("mlkit.serving:bento_models", "mlkit.bento:bento_models"),
    ("mlkit.serving:service_config", "mlkit.service:service_config"), ("mlkit.serving:model_server", "mlkit.service:model_server"),
    ("mlkit.serving:guard_service", "mlkit.service:guard_service"), ("mlkit.serving:read_prediction_log", "mlkit.predlog:read_prediction_log"),
    ("mlkit.data:Contract", "mlkit.contracts:Contract"), ("mlkit.data:snapshot", "mlkit.snapshots:snapshot"),
    ("mlkit.data:profile_frame", "mlkit.profiles:profile_frame"), ("mlkit.data:atomic_write", "mlkit.core:atomic_write"),
    ("mlkit.registry:verify_ledger", "mlkit.ledger:verify_ledger"), ("mlkit.registry:read_ledger", "mlkit.ledger:read_ledger"),
    ("mlkit.registry:GateFailed", "mlkit.gate:GateFailed"), ("mlkit.monitoring:render_html", "mlkit.reports:render_report"),
    ("mlkit.monitoring:drift", "mlkit.drift:drift"), ("mlkit.monitoring:tally", "mlkit.drift:tally"),
    ("mlkit.monitoring:card_data", "mlkit.card:card_data"), ("mlkit.features:MISSING_CATEGORY", "mlkit.fitting:MISSING_CATEGORY"),
    ("mlkit.cli:build", "mlkit.bento:build"), ("mlkit.cli:post_json", "mlkit.demo:post_json")])
def test_names_that_moved_are_found_with_a_deprecation_warning(old, new):
    (om, on), (nm, nn) = old.split(":"), new.split(":")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert getattr(importlib.import_module(om), on) is getattr(importlib.import_module(nm), nn)
    assert any(issubclass(w.category, DeprecationWarning) and f"moved to {nm}.{nn}" in str(w.message) for w in seen)


def test_a_star_import_of_an_old_module_finds_the_moved_names():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        scope: dict = {}
        exec("from mlkit.serving import *", scope)
    assert {"Predictor", "bento_models", "ModelServer", "free_port"} <= set(scope)
    assert "bento_models" in dir(importlib.import_module("mlkit.serving"))
