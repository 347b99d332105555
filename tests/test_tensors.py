"""Tensor and image preprocessing parity (property-based): a batch of values gives, row for row, exactly what each value
gives alone, whatever the sizes, channels and steps; a spec read back from JSON gives the same; the training frame's path
and the served records' path agree. And the tensor path needs torch and numpy only; the serving device is chosen from
the setting, the machine and the model."""
import base64
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
