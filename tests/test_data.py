"""Data layer through the CLI: ten kinds of bad input, snapshots that are content-addressed, profiles, and the
training run that stops at a broken contract."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, mlkit, project_env, write_project

from mlkit.contracts import Contract
from mlkit.data import DataError, load_penguins, penguins_path, read_data
from mlkit.snapshots import content_hash, snapshot

CONTRACT = REPO / "nbs" / "train" / "penguins.contract.yaml"


@pytest.fixture
def env(tmp_path):
    return project_env(write_project(tmp_path / "proj"))


def _csv(path, df):
    df.write_csv(path, null_value="NA")
    return path


def _keyed_contract(tmp_path):
    "The penguins contract plus a unique `id` key column."
    d = Contract.load(CONTRACT).to_dict()
    d["columns"] = {"id": {"dtype": "int", "unique": True}, **d["columns"]}
    for k in ("format",): d.pop(k)
    p = tmp_path / "keyed.contract.yaml"
    p.write_text(json.dumps(d))
    return p


def _penguins_with_id():
    return load_penguins().with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))


# (name, how to make the bad file, expected exit code, text naming the column or row)
def _cases(tmp_path):
    p = load_penguins()
    mk = {
        "missing column": (lambda f: _csv(f, p.drop("island")), 1, "column 'island': present failed"),
        "wrong dtype": (lambda f: _csv(f, p.with_columns(pl.col("body_mass_g").cast(pl.String).str.replace("^3750$", "heavy"))),
                        1, "column 'body_mass_g': dtype failed: expected float, found String"),
        "nulls in non-null column": (lambda f: _csv(f, p.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(None).otherwise(pl.col("island")).alias("island"))),
                                     1, "column 'island': not_null failed: 3 of 344 rows"),
        "out of range": (lambda f: _csv(f, p.with_columns(pl.when(pl.int_range(pl.len()) == 10).then(999.0).otherwise(pl.col("bill_length_mm")).alias("bill_length_mm"))),
                         1, "column 'bill_length_mm': max failed: 1 of 344 rows"),
        "unknown category": (lambda f: _csv(f, p.with_columns(pl.col("island").str.replace("Dream", "Atlantis"))),
                             1, "column 'island': categories failed: 124 of 344 rows"),
        "duplicate key": (lambda f: _csv(f, _penguins_with_id().with_columns(pl.when(pl.col("id") == 5).then(4).otherwise(pl.col("id")).alias("id"))),
                          1, "column 'id': unique failed: 2 of 344 rows"),
        "empty file": (lambda f: f.write_text(""), 2, "empty file"),
        "truncated parquet": (lambda f: f.write_bytes(_parquet_bytes(p)[:600]), 2, "not a readable Parquet file"),
        "ragged csv row": (lambda f: f.write_text("species,island\nAdelie,Dream\nAdelie,Dream,extra\n"), 2, "line 3: 3 fields, the header has 2"),
        "non-utf8 file": (lambda f: f.write_bytes(penguins_path().read_bytes().replace(b"Torgersen,39.1", b"Torg\xe9rsen,39.1", 1)),
                          2, "line 2: byte 0xe9"),
    }
    return mk


def _parquet_bytes(df):
    import io
    b = io.BytesIO()
    df.write_parquet(b)
    return b.getvalue()


CASES = ["missing column", "wrong dtype", "nulls in non-null column", "out of range", "unknown category", "duplicate key",
         "empty file", "truncated parquet", "ragged csv row", "non-utf8 file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_and_nothing_is_written(case, tmp_path, env):
    make, code, needle = _cases(tmp_path)[case]
    f = tmp_path / ("bad.parquet" if "parquet" in case else "bad.csv")
    make(f)
    contract = _keyed_contract(tmp_path) if case == "duplicate key" else CONTRACT
    r = mlkit("data", "check", f, "--contract", contract, env=env)
    assert r.returncode == code, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert str(f) in r.stderr and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # a snapshot of bad input that cannot be read stores nothing, not even a temp file
    r2 = mlkit("data", "snapshot", f, env=env)
    snaps = tmp_path / "proj" / "state" / "snapshots"
    if code == 2:
        assert r2.returncode == 2 and str(f) in r2.stderr
        assert not snaps.exists() or list(snaps.iterdir()) == []


def test_check_json_lists_every_check(tmp_path, env):
    r = mlkit("data", "check", penguins_path(), "--contract", CONTRACT, "--json", env=env, check=True)
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["rows"] == 344 and len(rep["checks"]) >= 20
    assert {c["check"] for c in rep["checks"]} >= {"dtype", "not_null", "min", "max", "categories", "row_count"}


def test_failed_check_reports_offending_rows(tmp_path, env):
    f = _csv(tmp_path / "bad.csv", load_penguins().with_columns(pl.col("island").str.replace("Dream", "Atlantis")))
    r = mlkit("data", "check", f, "--contract", CONTRACT, "--json", env=env)
    rep = json.loads(r.stdout)
    (fail,) = [c for c in rep["checks"] if not c["passed"]]
    assert fail["column"] == "island" and fail["failing"] == 124 and len(fail["examples"]) == 5
    assert all(e["island"] == "Atlantis" for e in fail["examples"])


def test_snapshot_id_is_content_addressed(tmp_path, env):
    r1 = mlkit("data", "snapshot", penguins_path(), env=env, check=True).stdout.strip()
    # same content from another format and folder, in another process: same id, stored once
    pq = tmp_path / "copy" / "penguins.parquet"
    pq.parent.mkdir()
    read_data(penguins_path()).write_parquet(pq)
    r2 = mlkit("data", "snapshot", pq, "--json", env=env, check=True)
    assert json.loads(r2.stdout)["id"] == r1
    assert len(list((tmp_path / "proj" / "state" / "snapshots").glob("*.parquet"))) == 1
    # a one-cell change gives another id
    df = read_data(penguins_path())
    changed = df.with_columns(pl.when(pl.int_range(pl.len()) == 100).then(pl.col("body_mass_g") + 1).otherwise(pl.col("body_mass_g")).alias("body_mass_g"))
    assert content_hash(changed) != r1


def test_snapshot_id_is_stable_across_machines():
    "A fixed frame has a fixed id: the hash is of a canonical text form, not of memory layout or Parquet bytes."
    df = pl.DataFrame({"a": [1, None, 3], "b": [0.1, 2.5, None], "c": ["x", None, "z, with comma"]})
    assert content_hash(df) == GOLDEN_ID and content_hash(df, 1) == GOLDEN_ID_V1
    assert content_hash(read_data(penguins_path())) == PENGUINS_ID and content_hash(read_data(penguins_path()), 1) == PENGUINS_ID_V1
    no_text_null = df.with_columns(pl.col("c").fill_null("y"))  # nulls in numbers only: format 2 keeps format 1's id
    assert content_hash(no_text_null) == content_hash(no_text_null, 1) == NO_TEXT_NULL_ID


GOLDEN_ID = "sha256:17567ff931927f395cf90d2782ee8c8e8c592c7eae58d2fae3f22fde2e571b9e"
PENGUINS_ID = "sha256:fbb66cc94ffd983bde7c383de0dc10b9f6785c1d23a5ec746d969461b2865e53"
GOLDEN_ID_V1 = "sha256:1515b8720ad7dc5dcd425f16fe1f32fd01b6ddc7a083efbfa90eafb41f20d206"  # format 1 (before null marks)
PENGUINS_ID_V1 = "sha256:ffe42f6ea18918eedf81a71e16c696d33435aed5a544499782ffcfdd364a6580"
NO_TEXT_NULL_ID = "sha256:2329e012107ace37395ebc254a4c5f564b28e7faf42f1c872af6515d1faf01dd"
V1_FIXTURE = REPO / "tests" / "fixtures" / "snapshot_v1"  # written by the format 1 code: nulls and the text \N, .json without "format"


@pytest.mark.parametrize("dtype", [pl.String, pl.Categorical, pl.Enum(["a", "\\N"]), pl.List(pl.String),
                                   pl.Struct({"k": pl.String}), pl.Binary])
def test_a_null_and_the_text_backslash_n_have_two_ids(dtype):
    "Format 1 wrote both as the CSV cell \"\\N\"; format 2 tells them apart, in every column type."
    val = {pl.List(pl.String): ["\\N"], pl.Struct({"k": pl.String}): {"k": "\\N"}, pl.Binary: b"\\N"}.get(dtype, "\\N")
    a = pl.DataFrame({"c": pl.Series([val, None], dtype=dtype), "n": [1, 2]})
    b = pl.DataFrame({"c": pl.Series([val, val], dtype=dtype), "n": [1, 2]})
    assert content_hash(a) != content_hash(b)


def test_a_snapshot_stored_before_formats_loads_verifies_and_keeps_its_id(tmp_path):
    from mlkit.snapshots import FORMAT, load_snapshot, snapshot_record
    (pq,) = V1_FIXTURE.glob("*.parquet")
    assert "format" not in json.loads(pq.with_suffix(".json").read_text())
    store = tmp_path / "snapshots"
    shutil.copytree(V1_FIXTURE, store)
    df = load_snapshot(f"sha256:{pq.stem}", store)  # verified with the format 1 hash
    assert df["name"].to_list() == ["ada", None, "\\N", 'x, "quoted"'] and df["raw"].null_count() == 1
    assert content_hash(df, 1) == f"sha256:{pq.stem}" != content_hash(df)
    assert snapshot_record(f"sha256:{pq.stem}", store).format == 1
    assert snapshot(df, store).id == f"sha256:{pq.stem}"  # the same values again: the stored version
    twin = df.with_columns(pl.col("name").fill_null("\\N"))  # format 1's twin: same old id, other values
    assert content_hash(twin, 1) == f"sha256:{pq.stem}"
    new = snapshot(twin, store)
    assert new.id == content_hash(twin) != f"sha256:{pq.stem}" and new.format == FORMAT
    assert json.loads(Path(new.path).with_suffix(".json").read_text())["format"] == FORMAT
    assert load_snapshot(new.id, store).equals(twin)
    # a changed value in the old file is refused, as in format 2
    p = store / pq.name
    p.chmod(0o644)
    df.with_columns(pl.col("n") + 1).write_parquet(p)
    with pytest.raises(DataError, match="does not match the snapshot id"): load_snapshot(f"sha256:{pq.stem}", store)


def test_snapshot_is_immutable_and_verified(tmp_path):
    snap = snapshot(load_penguins(), tmp_path)
    p = tmp_path / f"{snap.id.split(':')[1]}.parquet"
    assert not (p.stat().st_mode & 0o222)  # read-only
    from mlkit.snapshots import load_snapshot
    p.chmod(0o644)
    pl.read_parquet(p).with_columns(pl.col("year") + 1).write_parquet(p)
    with pytest.raises(DataError, match="does not match the snapshot id"): load_snapshot(snap.id, tmp_path)


def test_profile_command_writes_json(tmp_path, env):
    out = tmp_path / "profile.json"
    mlkit("data", "profile", penguins_path(), "-o", out, env=env, check=True)
    prof = json.loads(out.read_text())
    assert prof["rows"] == 344
    bm = prof["columns"]["body_mass_g"]
    assert bm["kind"] == "number" and abs(sum(bm["bins"]["shares"]) - 1) < 1e-9 and len(bm["bins"]["edges"]) == 9
    assert prof["columns"]["island"]["frequencies"]["Biscoe"] == pytest.approx(168 / 344)


def test_contract_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("columns:\n  a: {dtype: decimal}\n")
    with pytest.raises(DataError, match=f"{bad}: column 'a': dtype 'decimal'"): Contract.load(bad)


def test_synthetic_scales_and_is_seeded():
    code = "from mlkit.data import synthetic; df = synthetic(2_000_000, seed=3); print(df.height, df['id'].n_unique())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2000000", "2000000"]


@pytest.mark.papermill
def test_training_stops_at_a_broken_contract(tmp_path):
    "A training run whose data breaks the contract fails naming the column and check, and registers nothing."
    train = tmp_path / "train"
    train.mkdir()
    shutil.copy(REPO / "nbs/train/penguins.ipynb", train)
    text = CONTRACT.read_text().replace("body_mass_g: {dtype: float, nullable: true, min: 2500, max: 6500}",
                                        "body_mass_g: {dtype: float, nullable: true, min: 2500, max: 5000}")
    (train / "penguins.contract.yaml").write_text(text)
    ini = write_project(tmp_path / "proj")
    ini.write_text(ini.read_text().replace(f"train_dir = {REPO / 'nbs' / 'train'}", f"train_dir = {train}"))
    env = project_env(ini)
    r = mlkit("train", "penguins", "-p", "epochs=1", env=env)
    assert r.returncode == 1 and "column 'body_mass_g': max failed" in r.stderr, r.stderr[-2000:]
    code = ("import mlkit.tracking as t; c = t.mlflow().MlflowClient(); "
            "print(len(c.search_registered_models()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
