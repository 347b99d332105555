"""The model bundle: pickle-free files, atomic writes, hash checks, and one Predictor for every consumer."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO

from mlkit.contracts import Contract, encode_labels
from mlkit.data import load_penguins
from mlkit.profiles import profile_frame
from mlkit.features import FeatureSpec
from mlkit.models import TabularMLP, build_model, bundle_sha256, load_bundle, model_config, save_bundle
from mlkit.inputs import InvalidInput
from mlkit.predictor import Predictor
from mlkit.train import fit, seed_everything

FEATURES = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    df = load_penguins()
    contract = Contract.load(REPO / "nbs/train/penguins.contract.yaml").subset(FEATURES)
    spec = FeatureSpec.from_contract(contract).fit(df)
    seed_everything(0)
    cfg = model_config(TabularMLP, n_features=len(spec.output_names), n_classes=3, hidden=[16])
    module = build_model(cfg)
    fit(module, spec.transform(df), encode_labels(df, contract), epochs=3, device="cpu")
    path = save_bundle(tmp_path_factory.mktemp("b") / "bundle", module, cfg, features=spec.to_dict(),
                       contract=contract.to_dict(), profile=profile_frame(df), metrics={"accuracy": 1.0}, lineage={"run": "x"})
    return {"path": path, "module": module, "spec": spec, "df": df}


def test_bundle_files_are_safetensors_and_json(bundle):
    names = sorted(p.name for p in bundle["path"].iterdir())
    assert names == ["contract.json", "features.json", "lineage.json", "metrics.json", "model.json",
                     "model.safetensors", "profile.json"]
    for p in bundle["path"].glob("*.json"): json.loads(p.read_text())
    raw = (bundle["path"] / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])["__metadata__"]["format"] == "mlkit-bundle-1"
    assert b"\x80\x04\x95" not in raw[:16]  # not a pickle stream


def test_predictor_matches_training_module(bundle):
    df = bundle["df"]
    pred = Predictor.from_bundle(bundle["path"], name="penguins", version="7", expected_sha256=bundle_sha256(bundle["path"]))
    rows = df.select(FEATURES).to_dicts()
    with torch.inference_mode():
        expected = torch.softmax(bundle["module"](torch.from_numpy(bundle["spec"].transform(df))), 1).numpy()
    np.testing.assert_allclose(pred.predict_proba(rows), expected, atol=1e-6)
    out = pred.respond(rows[:2])
    assert out["model"] == "penguins" and out["version"] == "7" and len(out["predictions"]) == 2
    assert set(out["predictions"][0]["probabilities"]) == {"Adelie", "Chinstrap", "Gentoo"}


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(bundle["path"], copy)
    expected = bundle_sha256(copy)
    metrics = copy / "metrics.json"
    metrics.write_text(metrics.read_text().replace("1.0", "0.5"))
    with pytest.raises(ValueError, match="does not match"): load_bundle(copy, expected_sha256=expected)


def test_model_json_cannot_name_arbitrary_code(bundle, tmp_path):
    import shutil
    copy = tmp_path / "evil"
    shutil.copytree(bundle["path"], copy)
    (copy / "model.json").write_text(json.dumps({"class": "subprocess.Popen", "kwargs": {"args": ["true"]}}))
    with pytest.raises(ValueError, match=r"'subprocess.Popen' is not in an allowed package \(mlkit\).*\[project\] model_packages"):
        load_bundle(copy)
    (copy / "model.json").write_text(json.dumps({"class": "subprocess.Popen", "kwargs": {"args": ["true"]}, "code": ["subprocess"]}))
    with pytest.raises(ValueError, match=r"a bundle cannot carry \['subprocess'\]"): load_bundle(copy)  # claiming to carry it
    (copy / "model.json").write_text(json.dumps({"class": "evilpkg.Popen", "kwargs": {}, "code": ["evilpkg"]}))
    with pytest.raises(ValueError, match="'evilpkg.Popen' is not in an allowed package"): load_bundle(copy)  # claimed, not carried


def test_failed_write_leaves_nothing(tmp_path):
    m = TabularMLP(3, 2, hidden=[4])
    with pytest.raises(TypeError): save_bundle(tmp_path / "b", m, model_config(TabularMLP, n_features=3, n_classes=2), metrics=object())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("row,field", [
    ({"bill_length_mm": "long"}, "bill_length_mm"),
    ({"bill_length_mm": float("nan")}, "bill_length_mm"),
    ({"island": 3}, "island"),
    ({"colour": "blue"}, "colour"),
    ({"island": None}, "island"),
])
def test_bad_records_name_the_field(bundle, row, field):
    good = bundle["df"].select(FEATURES).row(0, named=True)
    pred = Predictor.from_bundle(bundle["path"])
    with pytest.raises(InvalidInput) as e: pred.predict([good, {**good, **row}])
    assert e.value.field == field and e.value.row == 1 and field in str(e.value)


def test_pickled_weights_are_refused(bundle, tmp_path):
    "A bundle whose weights file was replaced by a pickle (torch.save) is refused, never unpickled."
    import shutil
    copy = tmp_path / "pickled"
    shutil.copytree(bundle["path"], copy)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self): return (open, (str(marker), "w"))
    torch.save({"net.0.weight": Evil()}, copy / "model.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"): load_bundle(copy)
    with pytest.raises(ValueError, match="not a safetensors file"): Predictor.from_bundle(copy)
    assert not marker.exists()


def test_a_stored_model_without_a_consistent_hash_never_serves(bundle, tmp_path):
    "BentoML's store keeps the bundle's hash as a label, in the metadata and in the tag: missing or disagreeing, it is refused."
    import shutil
    from types import SimpleNamespace as NS
    from mlkit.bento import predictor_from_bento
    shutil.copytree(bundle["path"], tmp_path / "m" / "bundle")
    sha = bundle_sha256(bundle["path"])
    stored = lambda labels, meta, version: NS(path=str(tmp_path / "m"), tag=NS(name="m", version=version),
                                              info=NS(labels=labels, metadata=meta))
    good = {"mlkit_model": "m", "mlkit_version": "1", "mlkit_bundle_sha256": sha}
    assert predictor_from_bento(stored(good, {"mlkit.bundle_sha256": sha}, f"v1-{sha[7:15]}")).version == "1"
    assert predictor_from_bento(stored(good, {}, f"v1-{sha[7:15]}"), expected=sha).version == "1"  # as its Bento recorded
    for labels, meta, version in [({k: v for k, v in good.items() if k != "mlkit_bundle_sha256"}, {}, f"v1-{sha[7:15]}"),
                                  ({**good, "mlkit_bundle_sha256": ""}, {}, f"v1-{sha[7:15]}"),
                                  (good, {"mlkit.bundle_sha256": "sha256:00"}, f"v1-{sha[7:15]}"), (good, {}, "v1-00000000")]:
        with pytest.raises(ValueError, match="its bundle hash is missing or its records disagree"): predictor_from_bento(stored(labels, meta, version))
    for expected in ("", "sha256:" + "0" * 64):  # the Bento recorded none (a Bento of format 2 always does), or another
        with pytest.raises(ValueError, match="its bundle hash is missing or its records disagree"):
            predictor_from_bento(stored(good, {}, f"v1-{sha[7:15]}"), expected=expected)
    (tmp_path / "m" / "bundle" / "metrics.json").write_text("{}")  # the records agree, the bundle does not
    with pytest.raises(ValueError, match="does not match the expected"): predictor_from_bento(stored(good, {}, f"v1-{sha[7:15]}"))


def test_a_hash_on_record_is_checked_even_when_empty(bundle, tmp_path):
    "`expected_sha256` fails closed: an empty record (nothing was recorded) is refused, never taken as no check; None alone skips it."
    sha = bundle_sha256(bundle["path"])
    assert Predictor.from_bundle(bundle["path"], expected_sha256=sha).kind == "classification"
    assert Predictor.from_bundle(bundle["path"], expected_sha256=None).kind == "classification"  # the caller vouches for it
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="no bundle hash was recorded for it"): load_bundle(bundle["path"], expected_sha256=empty)
        with pytest.raises(ValueError, match="no bundle hash was recorded for it"): Predictor.from_bundle(bundle["path"], expected_sha256=empty)
