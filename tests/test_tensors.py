"""Tensor and image preprocessing parity (property-based): a batch of values gives, row for row, exactly what each value
gives alone, whatever the sizes, channels and steps; a spec read back from JSON gives the same; the training frame's path
and the served records' path agree. And the tensor path needs torch and numpy only; the serving device is chosen from
the setting, the machine and the model."""
import base64
import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlkit.features import FeatureSpec, frame_inputs, record_inputs
from mlkit.tensors import FieldSpec, InvalidInput, TensorSpec

sizes = st.tuples(st.integers(4, 40), st.integers(4, 40))


@st.composite
def image_cases(draw):
    "An image field (channels, a size range, steps) and 1-6 images of varied sizes in varied forms."
    channels = draw(st.sampled_from([1, 3, 4]))
    out = draw(sizes)
    crop = draw(st.one_of(st.none(), st.tuples(st.integers(2, out[0]), st.integers(2, out[1]))))
    steps = [{"op": "resize", "size": list(out)}, *([{"op": "center_crop", "size": list(crop)}] if crop else []),
             *draw(st.sampled_from([[], [{"op": "scale", "factor": 1 / 255}], [{"op": "scale", "factor": 0.5}, {"op": "normalize"}]]))]
    field = FieldSpec("img", {"dtype": "image", "size": {"min": [4, 4], "max": [40, 40]}, "channels": channels, "preprocess": steps})
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = []
    for _ in range(draw(st.integers(1, 6))):
        h, w = draw(sizes)
        a = rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w)).astype(np.uint8)
        form = draw(st.sampled_from(["list", "png", "bytes", "array"]))
        if form in ("png", "bytes"):
            from PIL import Image
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG")
            values.append(base64.b64encode(buf.getvalue()).decode() if form == "png" else buf.getvalue())
        else: values.append(a.tolist() if form == "list" else a)
    return field, values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_cases())
def test_an_image_batch_is_its_values_one_by_one(case):
    field, values = case
    fitted = field.fit(values)
    batch = fitted.batch(values)
    assert tuple(batch.shape) == (len(values), *fitted.out_shape)
    for i, v in enumerate(values): assert torch.equal(batch[i], fitted.batch([v])[0]), i
    again = FieldSpec.from_dict(json.loads(json.dumps(fitted.to_dict())))  # as the bundle stores it
    assert torch.equal(again.batch(values), batch)
    decoded = [fitted.decode(v, i) for i, v in enumerate(values)]  # what request validation hands over
    assert torch.equal(fitted.batch(decoded), batch)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**32 - 1), st.booleans())
def test_a_tensor_batch_is_its_values_one_by_one(n, c, w, seed, normalize):
    rng = np.random.default_rng(seed)
    field = FieldSpec("x", {"dtype": "tensor", "shape": [c, None], "preprocess": [{"op": "normalize"}] if normalize else []})
    values = [rng.normal(size=(c, w)).tolist() for _ in range(n)]
    fitted = field.fit(values)
    batch = fitted.batch(values)
    for i, v in enumerate(values): assert torch.equal(batch[i], fitted.batch([v])[0])
    if normalize:
        assert np.allclose(batch.transpose(0, 1).reshape(c, -1).mean(1).numpy(), 0, atol=1e-5)  # fitted on these very values


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(0, 2**32 - 1))
def test_a_frame_and_its_records_give_the_module_the_same_input(n, seed):
    "Training (a frame: an Array column of pixels, a number) and serving (JSON records) feed the module identically."
    from mlkit.contracts import Contract
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 6, 5)).astype(np.uint8)
    df = pl.DataFrame({"image": pl.Series(pixels, dtype=pl.Array(pl.UInt8, (6, 5))), "size": rng.normal(size=n),
                       "y": rng.choice(["a", "b"], n)})
    c = Contract("t", {"image": {"dtype": "image", "size": [6, 5], "channels": 1}, "size": {"dtype": "float"},
                       "y": {"dtype": "string", "categories": ["a", "b"]}}, label="y")
    spec = FeatureSpec.from_contract(c, ["image", "size"]).fit(df)
    tensors = TensorSpec.from_contract(c.to_dict(), ["image", "size"]).fit({"image": list(pixels)})
    a = frame_inputs(spec, tensors, df)
    b = record_inputs(spec, tensors, [{"image": p.tolist(), "size": s} for p, s in zip(pixels, df["size"].to_list())])
    assert set(a) == {"image", "features"} and torch.equal(a["image"], b["image"]) and np.array_equal(a["features"], b["features"])


def test_bad_values_name_the_field_and_never_escape_as_other_errors():
    f = FieldSpec("img", {"dtype": "image", "size": [8, 8], "channels": 1})
    bad = [None, 3, "", "data:image/png;base64,", [[]], [[[[0]]]], [["a"] * 8] * 8, [[10**400] * 8] * 8, {"a": 1},
           b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"\xff\xd8\xff" + b"\0" * 100, [[float("inf")] * 8] * 8]
    for i, v in enumerate(bad):
        with pytest.raises(InvalidInput) as e: f.decode(v, i)
        assert e.value.field == "img" and e.value.row == i and str(e.value).startswith(f"rows[{i}].img: ")


def test_the_tensor_path_imports_with_torch_and_numpy_only():
    code = "import sys, mlkit.tensors; print(sorted(m for m in ('polars', 'PIL', 'pandas', 'mlflow', 'bentoml', 'yaml') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_serving_device_follows_the_setting_the_machine_and_the_model():
    from types import SimpleNamespace

    from mlkit.config import SettingsError
    from mlkit.service import serve_device
    image, table = SimpleNamespace(tensors=object()), SimpleNamespace(tensors=None)
    assert serve_device("auto", image, cuda=True).type == "cuda"
    assert serve_device("auto", table, cuda=True).type == "cpu"  # a small tabular model stays on the CPU
    assert serve_device("auto", image, cuda=False).type == "cpu"
    assert serve_device("cpu", image, cuda=True).type == "cpu"
    assert serve_device("cuda", table, cuda=True).type == "cuda"
    with pytest.raises(SettingsError, match="CUDA is not available"): serve_device("cuda", image, cuda=False)


def _per_row(fields: dict, rows: list):
    "What validation gave before a field was decoded for all rows at once: each row's values alone (or its error)."
    try: return [{**r, **{n: f.decode(r[n], i) for n, f in fields.items()}} for i, r in enumerate(rows)]
    except InvalidInput as e: return (str(e), e.field, e.row)


def _same(x, y) -> bool:
    "Two validation results alike: the same error, or the same rows holding equal float32 arrays."
    if isinstance(x, tuple) or isinstance(y, tuple): return x == y
    return len(x) == len(y) and all(a.keys() == b.keys() and all(
        type(a[k]) is type(b[k]) and np.array_equal(a[k], b[k]) and getattr(a[k], "dtype", None) == getattr(b[k], "dtype", None) for k in a)
        for a, b in zip(x, y))


def _validated(contract: dict, rows: list, fields: dict):
    from mlkit.inputs import validate_records
    try: return validate_records(contract, rows, None, fields)
    except InvalidInput as e: return (str(e), e.field, e.row)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([1, 3, 4]), st.integers(1, 40), st.sampled_from(["int", "float", "whole floats", "mixed"]),
       st.integers(0, 2**32 - 1))
def test_a_request_decoded_at_once_gives_what_its_rows_give_one_by_one(channels, n, pixels, seed):
    "Nested-list images of one shape take the stacked path; the decoded values, model batch and summaries are the row-by-row ones."
    from mlkit.inputs import decode_column
    rng = np.random.default_rng(seed)
    col = {"dtype": "image", "size": [5, 4], "channels": channels}
    contract = {"columns": {"image": col, "y": {"dtype": "string"}}, "label": "y"}
    a = rng.integers(0, 256, (n, 5, 4, channels)).astype(float)
    a[:, 0, 0], a[:, -1, -1] = 0, 255  # the edge values
    if pixels != "int": a[:, 1:3] = np.minimum(a[:, 1:3] + rng.random(a[:, 1:3].shape) * (pixels != "whole floats"), 255)
    vals = [(x[..., 0] if channels == 1 else x).tolist() for x in a]
    if pixels == "int": vals = [np.asarray(v).astype(int).tolist() for v in vals]
    if pixels == "mixed": vals = [np.asarray(v).astype(int).tolist() if i % 2 else v for i, v in enumerate(vals)]
    f = FieldSpec("image", col).fit(vals)
    assert decode_column(f, vals) is not None  # the stacked path is the one taken
    got, want = _validated(contract, [{"image": v} for v in vals], {"image": f}), _per_row({"image": f}, [{"image": v} for v in vals])
    for g, w in zip(got, want):
        assert type(g["image"]) is type(w["image"]) and g["image"].dtype == w["image"].dtype and np.array_equal(g["image"], w["image"])
    decoded = [r["image"] for r in got]
    assert torch.equal(f.batch(decoded), f.batch([r["image"] for r in want])) and torch.equal(f.batch(decoded), f.batch(vals))
    assert f.summarize(decoded) == f.summarize([r["image"] for r in want])
    s, x = f.summarize(decoded), np.asarray(want[-1]["image"]).reshape(channels, -1)  # what the numbers mean
    assert [s[f"image.mean.{c}"][-1] for c in range(channels)] == x.mean(1, dtype=np.float64).tolist()
    assert [s[f"image.std.{c}"][-1] for c in range(channels)] == x.std(1, dtype=np.float64).tolist()
    assert s["image.sha256"][-1] == hashlib.sha256(b"%dx5x4\0" % channels + x.astype(np.float32).tobytes()).hexdigest()
    one = [f.summarize([v]) for v in vals]  # a value's summary is the same alone, among others, missing ones between
    assert f.summarize([*vals[:1], None, *vals[1:]]) == {c: [one[0][c][0], None, *(s[c][0] for s in one[1:])] for c in one[0]}


@pytest.mark.parametrize("element", ["float32", "int64", "uint8"])
def test_a_tensor_field_decoded_at_once_gives_what_its_rows_give(element):
    rng = np.random.default_rng(1)
    col = {"dtype": "tensor", "shape": [2, 3], "element": element, "min": 0}
    contract = {"columns": {"t": col, "y": {"dtype": "string"}}, "label": "y"}
    f = FieldSpec("t", col)
    rows = [{"t": (rng.integers(0, 200, (2, 3)) + (0 if element != "float32" else rng.random((2, 3)))).tolist()} for _ in range(9)]
    got, want = _validated(contract, rows, {"t": f}), _per_row({"t": f}, rows)
    assert all(np.array_equal(g["t"], w["t"]) and g["t"].dtype == w["t"].dtype for g, w in zip(got, want))
    for bad in ([[0.5, 1, 2], [3, 4, 5]], [[-1, 1, 2], [3, 4, 5]], [[1, 2], [3, 4]], [[300, 1, 2], [3, 4, 5]], [[1e39, 1, 2], [3, 4, 5]]):
        rows2 = rows[:4] + [{"t": bad}] + rows[4:]
        assert _same(_validated(contract, rows2, {"t": f}), _per_row({"t": f}, rows2)), bad


def test_a_bad_row_in_a_request_is_named_as_row_by_row():
    "Any value the stacked path cannot take sends the request row by row: the same error, naming the same row and field."
    good = np.arange(64).reshape(8, 8).tolist()
    f, g = FieldSpec("a", {"dtype": "image", "size": [8, 8], "channels": 1}), FieldSpec("b", {"dtype": "image", "size": [8, 8], "channels": 1})
    contract = {"columns": {"a": f.column, "b": g.column, "y": {"dtype": "string"}}, "label": "y"}
    png = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, "PNG")
    bads = [[[True] * 8] * 8, [[0.0] * 7 + [float("nan")]] * 8, [[float("inf")] * 8] * 8, [[256] * 8] * 8, [[-1] * 8] * 8,
            [[0] * 8] * 9, [[[0, 0, 0]] * 8] * 8, [[0] * 8] * 7 + [[0] * 3], [["1"] * 8] * 8, [[None] * 8] * 8, [[10**400] * 8] * 8,
            [], [[]], [[[[0]]]], "%%%", [[0] * 8] * 7 + [[True] * 8], [[1, True] + [0] * 6] * 8, 7]
    for bad in bads:
        for where in (0, 3):
            rows = [{"a": good, "b": good} for _ in range(5)]
            rows[where] = {**rows[where], "b": bad}
            got = _validated(contract, rows, {"a": f, "b": g})
            assert isinstance(got, tuple) == (bad not in bads[-3:-1]) and _same(got, _per_row({"a": f, "b": g}, rows)), (bad, got)
    # a PNG among pixel lists: decoded row by row, the same values
    rows = [{"a": good, "b": good}, {"a": base64.b64encode(png.getvalue()).decode(), "b": good}]
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(_validated(contract, rows, {"a": f, "b": g}), _per_row({"a": f, "b": g}, rows)) for k in "ab")
    # errors in two fields: the first in row order, as row by row
    rows = [{"a": good, "b": good} for _ in range(6)]
    rows[4]["a"], rows[2]["b"] = [[300] * 8] * 8, [[-3] * 8] * 8
    assert _validated(contract, rows, {"a": f, "b": g})[0].startswith("rows[2].b: ")
