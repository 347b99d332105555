"""Issue 18, exits that were tracebacks: through the real `mlkit` command, a bad setting, state folder, data file or
closed pipe ends in exit 2 and one bounded line on stderr naming the file, setting or column (a closed pipe: exit 141
and nothing at all), never a traceback nor megabytes of quoted data."""
import os
import subprocess

import polars as pl
import pytest
from conftest import MLKIT, REPO, mlkit, project_env, write_project

CONTRACT = REPO / "nbs" / "train" / "penguins.contract.yaml"
ROOT = os.geteuid() == 0  # root reads and writes through permissions: those cases cannot be made here


@pytest.fixture
def project(tmp_path):
    ini = write_project(tmp_path / "project")
    return ini, project_env(ini)


def one_line(r: subprocess.CompletedProcess, *parts: str, code: int = 2) -> str:
    "Assert exit `code`, no traceback and exactly one line on stderr that contains every one of `parts`; return it."
    lines = r.stderr.splitlines()
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert all(p in lines[0] for p in parts), (parts, lines[0])
    assert len(lines[0]) <= 600, len(lines[0])
    return lines[0]


def set_ini(ini, text: str):
    ini.write_text(ini.read_text() + text)


# 1. a state folder that cannot be one

def test_state_dir_that_is_a_file(project, tmp_path):
    ini, env = project
    (tmp_path / "taken").write_text("a file")
    ini.write_text(ini.read_text().replace("state_dir = state", f"state_dir = {tmp_path / 'taken'}"))
    for args in (["gc", "--dry-run"], ["data", "snapshot", REPO / "nbs" / "train" / "penguins.yaml"], ["models", "history", "penguins"]):
        one_line(mlkit(*args, env=env), f"{ini}: [project] state_dir = {tmp_path / 'taken'}: a file, not a folder")


@pytest.mark.parametrize("where", ["below a file", "cannot be created"])
def test_state_dir_that_cannot_be_created(project, tmp_path, where):
    ini, env = project
    (tmp_path / "taken").write_text("a file")
    sd = tmp_path / "taken" / "state" if where == "below a file" else "/proc/mlkit-no-such-folder/state"
    env = {**env, "MLKIT_PROJECT__STATE_DIR": str(sd)}  # from the environment: the message names the variable
    one_line(mlkit("gc", "--dry-run", env=env), f"environment variable MLKIT_PROJECT__STATE_DIR: [project] state_dir = {sd}: cannot create")


@pytest.mark.skipif(ROOT, reason="root writes into a read-only folder")
def test_state_dir_that_is_not_writable(project, tmp_path):
    ini, env = project
    (ro := tmp_path / "ro").mkdir()
    (ro / "state").mkdir()
    ro.chmod(0o555), (ro / "state").chmod(0o555)
    try: one_line(mlkit("gc", "--dry-run", env={**env, "MLKIT_PROJECT__STATE_DIR": str(ro / "state")}), "[project] state_dir", str(ro / "state"))
    finally: ro.chmod(0o755), (ro / "state").chmod(0o755)


# 2. floats that are not finite, and other bad settings

def float_settings() -> list[tuple[str, str]]:
    from mlkit.config import _SCHEMA
    return [(s, k) for s, keys in _SCHEMA.items() for k, spec in keys.items() if spec[0] is float]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_snapshot_days_not_finite_in_the_file(project, value):
    ini, env = project
    set_ini(ini, f"[retention]\nsnapshot_days = {value}\n")
    one_line(mlkit("gc", "--dry-run", env=env), f"{ini}: [retention] snapshot_days = '{value}' is not a finite number")


@pytest.mark.parametrize("section,key", float_settings())
def test_every_float_setting_refuses_inf_from_the_environment(project, section, key):
    _, env = project
    var = f"MLKIT_{section.upper()}__{key.upper()}"
    one_line(mlkit("gc", "--dry-run", env={**env, var: "inf"}), f"environment variable {var}: [{section}] {key} = 'inf' is not a finite number")


def test_gc_with_the_largest_retention_runs(project):
    ini, env = project
    set_ini(ini, "[retention]\nsnapshot_days = 1000000\nprediction_log_days = 1e6\ndeleted_run_days = 999999.5\n")
    r = mlkit("gc", "--dry-run", env=env)
    assert r.returncode == 0 and "would remove 0 item(s)" in r.stdout, r.stderr[-3000:]
    ini.write_text(ini.read_text().replace("1000000", "1e300"))
    one_line(mlkit("gc", "--dry-run", env=env), "[retention] snapshot_days = '1e300' must be between 0 and 1000000")


@pytest.mark.parametrize("case,message", [
    ("port", "environment variable MLKIT_SERVE__PORT: [serve] port = '99999' must be a port number"),
    ("floors", "[gate] floors = 'test_accuracy>=1.2.3' is not a comma-separated list"),
    ("settings folder", "a folder, not a settings file"),
    ("not utf-8", "settings.ini: not UTF-8 text (byte 0xe9"),
    ("huge value", "(1,999,9"),
    ("workers", "environment variable MLKIT_SERVE__WORKERS: [serve] workers = '100000' must be 1-512"),
])
def test_bad_settings_are_one_line(project, case, message):
    ini, env = project
    if case == "port": env = {**env, "MLKIT_SERVE__PORT": "99999"}
    if case == "workers": env = {**env, "MLKIT_SERVE__WORKERS": "100000"}
    if case == "floors": set_ini(ini, "[gate]\nfloors = test_accuracy>=1.2.3\n")
    if case == "settings folder": env = {**env, "MLKIT_SETTINGS": str(ini.parent)}
    if case == "not utf-8": ini.write_bytes(ini.read_bytes() + b"[card]\nowner = caf\xe9\n")
    if case == "huge value": set_ini(ini, f"[serve]\nport = {'9' * 2_000_000}\n")  # quoted briefly, not whole
    one_line(mlkit("env", env=env), message)


@pytest.mark.skipif(ROOT, reason="root reads a file whatever its mode")
def test_unreadable_settings_file(project):
    ini, env = project
    ini.chmod(0)
    try: one_line(mlkit("env", env=env), f"{ini}: cannot read the settings file")
    finally: ini.chmod(0o644)


# 3. Parquet column types no contract dtype holds

def odd_parquet(path):
    import datetime as dt
    import decimal
    cols = {"id": pl.Series([1, 2, 3]),
            "nested": pl.Series([[[1, 2], [3]], [[4]], None], dtype=pl.List(pl.List(pl.Int64))),
            "struct": pl.Series([{"a": 1, "b": "u"}, {"a": 2, "b": "v"}, None]),
            "duration": pl.Series([dt.timedelta(1), dt.timedelta(2), None]),
            "decimal": pl.Series([decimal.Decimal("1.5"), decimal.Decimal("2.25"), None], dtype=pl.Decimal(10, 2)),
            "categorical": pl.Series(["a", "b", None], dtype=pl.Categorical),
            "enum": pl.Series(["a", "b", None], dtype=pl.Enum(["a", "b"])),
            "nothing": pl.Series([None, None, None], dtype=pl.Null),
            "binary": pl.Series([b"ab", b"\x00\xff", None]),
            "time": pl.Series([dt.time(1), dt.time(2), None]),
            "map": pl.Series([{"k": 1}, None, {"k": 2}], dtype=pl.Map(pl.String, pl.Int64))}
    pl.DataFrame(cols).write_parquet(path)
    return list(cols)


@pytest.mark.parametrize("dtype", ["string", "float", "int"])
def test_odd_parquet_types_snapshot_profile_and_check(project, tmp_path, dtype):
    import yaml
    _, env = project
    cols = odd_parquet(data := tmp_path / "odd.parquet")
    snap = mlkit("data", "snapshot", data, env=env)
    assert snap.returncode == 0 and snap.stdout.startswith("sha256:") and not snap.stderr, snap.stderr[-3000:]
    prof = mlkit("data", "profile", data, env=env)
    assert prof.returncode == 0 and '"rows": 3' in prof.stdout, prof.stderr[-3000:]
    spec = {"dtype": dtype, "nullable": True, **({"categories": ["a", "b"]} if dtype == "string" else {"min": 0})}
    (contract := tmp_path / "odd.yaml").write_text(yaml.safe_dump({"name": "odd", "columns": {c: spec for c in cols if c != "id"}}))
    r = mlkit("data", "check", data, "--contract", contract, env=env)
    fits = {"string": {"categorical", "enum", "nothing"}, "float": {"decimal", "nothing"}, "int": {"nothing"}}[dtype]
    failed = {line.split("'")[1] for line in r.stderr.splitlines()}
    assert r.returncode == 1 and failed == set(cols) - {"id"} - fits and "Traceback" not in r.stderr, r.stderr
    assert all(": dtype failed: expected " + dtype in line for line in r.stderr.splitlines()), r.stderr
    prof = mlkit("data", "profile", data, "--contract", contract, env=env)
    assert prof.returncode == 0, prof.stderr[-3000:]


def test_odd_parquet_column_in_a_drafted_contract(project, tmp_path):
    ini, env = project
    odd_parquet(data := tmp_path / "odd.parquet")
    one_line(mlkit("new", "odd", "--data", data, "--label", "id", env=env, cwd=ini.parent), "mlkit new: column 'nested': its first value is not a regular array", "a contract takes int, float")
    pl.read_parquet(data).select("id", "struct").write_parquet(data)
    one_line(mlkit("new", "odd", "--data", data, "--label", "id", env=env, cwd=ini.parent), "column 'struct': its type Struct(", "has no contract dtype")


def test_string_categories_that_are_numbers(project, tmp_path):
    _, env = project
    (contract := tmp_path / "c.yaml").write_text("name: c\ncolumns:\n  code: {dtype: string, categories: [1, 2]}\n")
    (data := tmp_path / "d.csv").write_text("code\n1\n2\n")
    one_line(mlkit("data", "check", data, "--contract", contract, env=env), "mlkit data check: ", f"{contract}: column 'code'", "quote them")


# 4. a closed standard output

def closed_stdout(*args, env: dict) -> subprocess.CompletedProcess:
    "Run mlkit with standard output a pipe whose reader has gone: every write fails with EPIPE."
    r, w = os.pipe()
    os.close(r)
    try: return subprocess.run([MLKIT, *map(str, args)], stdout=w, stderr=subprocess.PIPE, env=env, text=True, timeout=600)
    finally: os.close(w)


@pytest.mark.parametrize("args", [["models", "history", "penguins"], ["env"], ["--help"], ["data", "profile", REPO / "nbs" / "train" / "penguins.yaml"]])
def test_closed_pipe_is_a_quiet_exit(project, args):
    _, env = project
    if args[-1] == REPO / "nbs" / "train" / "penguins.yaml":
        from mlkit.data import penguins_path
        args = ["data", "profile", penguins_path()]
    r = closed_stdout(*args, env=env)
    assert r.returncode == (0 if args == ["--help"] else 141) and r.stderr == "", (r.returncode, r.stderr[-3000:])  # argparse drops its own EPIPE


def test_head_closes_the_pipe_after_one_line(project, tmp_path):
    "`mlkit data profile wide.csv | head -1`: the profile is far over a pipe's buffer, so the write after `head` left fails."
    _, env = project
    pl.DataFrame({f"c{i}": range(50) for i in range(2_000)}).write_csv(wide := tmp_path / "wide.csv")
    r = subprocess.run(f"'{MLKIT}' data profile '{wide}' | head -1; echo \"exit ${{PIPESTATUS[0]}}\"", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.stdout.splitlines() == ["{", "exit 141"] and r.stderr == "", (r.stdout[-500:], r.stderr[-3000:])


@pytest.mark.papermill
def test_closed_pipe_after_a_training_run(trained):
    r = closed_stdout("models", "lineage", "penguins@challenger", env=trained["env"])
    assert r.returncode == 141 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-3000:]


# 5. a 50 MB line in a data file: bounded output

BIG = 50_000_000
LIMIT = 64 * 1024


def big_files(tmp_path) -> dict:
    "Penguins-shaped files, each with one 50 MB line: an unclosed quote, a cell, a line that is not JSON, a header."
    from mlkit.data import penguins_path
    head, first, *rest = penguins_path().read_text().splitlines(keepends=True)
    x = "x" * BIG
    files = {"quote.csv": head + first + f'Adelie,"{x}\n' + "".join(rest),
             "cell.csv": head + first + first.replace("Torgersen", x, 1) + "".join(rest),
             "line.csv": head + first + x + "\n" + "".join(rest),
             "line.ndjson": '{"species": "Adelie"}\n' + x + "\n",
             "header.csv": x + "\n1\n"}
    for name, text in files.items(): (tmp_path / name).write_text(text)
    return {name: tmp_path / name for name in files}


def bounded(r: subprocess.CompletedProcess, data) -> None:
    assert len(r.stdout) + len(r.stderr) < LIMIT, (data, len(r.stdout), len(r.stderr), r.stderr[:300])
    assert "Traceback" not in r.stderr, r.stderr[:3000]


def test_a_50_mb_line_gives_bounded_output(project, tmp_path):
    _, env = project
    files = big_files(tmp_path)
    for name, data in files.items():
        for args in (["data", "check", data, "--contract", CONTRACT], ["data", "check", data, "--contract", CONTRACT, "--json"],
                     ["data", "profile", data], ["data", "snapshot", data]):
            r = mlkit(*args, env=env)
            bounded(r, (name, args[1]))
            unreadable = name in ("quote.csv", "line.ndjson", "header.csv")
            if unreadable or args[1] == "check": assert r.returncode in (1, 2) and str(data) in r.stderr, (name, args, r.stderr[:500])
            if unreadable: one_line(r, f"mlkit data {args[1]}: {data}: ")
    r = mlkit("data", "check", files["cell.csv"], "--contract", CONTRACT, env=env)
    assert r.returncode == 1 and "column 'island': categories failed: 1 of 345 rows" in r.stderr and "more characters" in r.stdout, r.stderr


@pytest.mark.papermill
def test_predict_on_a_50_mb_line_is_bounded(trained, tmp_path):
    files = big_files(tmp_path)
    for name in ("quote.csv", "line.ndjson", "header.csv", "cell.csv", "line.csv"):
        r = mlkit("predict", "penguins@challenger", files[name], tmp_path / "out.parquet", env=trained["env"])
        bounded(r, name)
        if name in ("cell.csv", "line.csv"): continue  # readable: an island never seen, a row of nulls
        assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(f"mlkit predict: {files[name]}: "), (name, r.stderr[-600:])


def test_a_host_name_is_one_line_before_anything_starts(project):
    "BentoML binds IP addresses: `--host localhost` is refused before a build or a server (it used to fail after both)."
    ini, env = project
    one_line(mlkit("serve", "penguins", "--host", "localhost", env=env), "[serve] host = 'localhost': BentoML binds an IP address")
