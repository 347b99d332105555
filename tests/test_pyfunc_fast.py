"""MLflow's pyfunc of an mlkit bundle reads a DataFrame by column (`mlkit.pyfunc_model`): the same answers as the record
path (`Predictor.predict` of the same rows as records) for small and large frames, with missing values, category columns
and numbers given as ints; a bad value is refused with the record path's error, naming its row and column."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

BUNDLE = REPO / "tests" / "fixtures" / "pre_split" / "mlflow_model" / "artifacts" / "bundle"
ISLANDS, SEXES = ["Biscoe", "Dream", "Torgersen"], ["female", "male", None]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    "The fixture bundle saved as MLflow saves a logged mlkit model (this checkout's pyfunc_model.py, its signature), loaded back."
    import mlflow

    from mlkit.tracking import contract_signature, pyfunc_code
    d = tmp_path_factory.mktemp("pyfunc")
    shutil.copytree(BUNDLE, d / "bundle")
    contract = json.loads((BUNDLE / "contract.json").read_text())
    mlflow.pyfunc.save_model(str(d / "model"), python_model=str(pyfunc_code()), artifacts={"bundle": str(d / "bundle")},
                             signature=contract_signature(contract))
    return mlflow.pyfunc.load_model(str(d / "model"))


def records(n: int, seed: int = 0) -> list[dict]:
    "Penguin rows with missing values (None), ints among the measurements and every island and sex."
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = {"island": ISLANDS[i % 3], "sex": SEXES[i % 3], "bill_length_mm": float(rng.normal(44, 5)),
             "bill_depth_mm": None if i % 7 == 3 else float(rng.normal(17, 2)), "flipper_length_mm": int(rng.integers(170, 230)),
             "body_mass_g": None if i % 11 == 5 else int(rng.integers(2800, 6000))}
        out.append(r)
    return out


def frame(rows: list[dict]) -> pd.DataFrame:
    "The rows as a client's DataFrame: the island a category column, an extra column the model does not read."
    df = pd.DataFrame(rows)
    return df.assign(island=df["island"].astype("category"), note="x")


def same(got: pd.DataFrame, want: list[dict]):
    assert got["label"].tolist() == [w["label"] for w in want]
    for c in ["Adelie", "Chinstrap", "Gentoo"]: np.testing.assert_array_equal(got[f"p_{c}"].to_numpy(), [w["probabilities"][c] for w in want])


@pytest.mark.parametrize("n", [1, 5, 100, 300, 5000])
def test_a_frame_and_its_records_get_the_same_answers(model, n):
    from mlkit.predictor import Predictor
    rows = records(n)
    want = Predictor.from_bundle(BUNDLE).predict(rows)
    df = frame(rows)
    same(model.unwrap_python_model().predict(None, df), want)  # the adapter as it stands: int64 columns among the numbers
    same(model.unwrap_python_model().predict(None, df.astype({"body_mass_g": "Int64", "sex": "string"})), want)  # pandas' nullable types
    # MLflow's schema takes no int64 for a double and no category for a string: what it lets through, whole numbers as floats
    floats = df.astype({"flipper_length_mm": "float64", "body_mass_g": "float64", "island": object})
    same(model.predict(floats), want)
    pd.testing.assert_frame_equal(model.predict(floats), Predictor.from_bundle(BUNDLE).predict_frame(floats), check_exact=True)


@pytest.mark.parametrize("n", [3, 300])
@pytest.mark.parametrize("change,message", [
    (lambda df: df.assign(body_mass_g=df["body_mass_g"].where(df.index != 2, np.inf)), "rows[2].body_mass_g: must be finite"),
    (lambda df: df.drop(columns="island"), "rows[0].island: required field is missing"),
    (lambda df: df.assign(island=df["island"].astype(object).where(df.index != 1, None)), "rows[1].island: required field is missing"),
    (lambda df: df.assign(bill_length_mm=df["bill_length_mm"].astype(object).where(df.index != 2, "long")), "rows[2].bill_length_mm: expected a number, got str"),
    (lambda df: df.assign(sex=df["sex"].astype(object).where(df.index != 1, 3)), "rows[1].sex: expected a string, got int")])
def test_a_bad_column_is_refused_naming_it(model, n, change, message):
    from mlkit.inputs import InvalidInput
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.unwrap_python_model().predict(None, change(frame(records(n))))  # what MLflow hands over when its schema lets it through


@pytest.mark.parametrize("n", [3, 300])
def test_a_bad_value_through_mlflow_is_refused_naming_it(model, n):
    from mlkit.inputs import InvalidInput
    df = frame(records(n)).astype({"flipper_length_mm": "float64", "body_mass_g": "float64", "island": object})
    with pytest.raises(InvalidInput, match=r"rows\[2\]\.body_mass_g: must be finite"):
        model.predict(df.assign(body_mass_g=df["body_mass_g"].where(df.index != 2, np.inf)))
