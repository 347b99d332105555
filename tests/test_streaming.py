"""Data beyond memory: `mlkit data check`, `profile` and `snapshot` on a Parquet file 4x larger than a cgroup memory cap."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import project_env, write_project

CG = Path("/sys/fs/cgroup/memory")  # cgroup v1 memory controller (root here)
CAP = 128 << 20  # the child's memory cap: python, polars and mlkit take ~33 MB of it before any data
ROWS = 13_250_000  # ~41 bytes a row in uncompressed Parquet: ~540 MB, over 4x the cap
MLKIT = Path(sys.executable).parent / "mlkit"  # the real CLI
CONTRACT = """name: big
label: churned
columns:
  id: {dtype: int, unique: true}
  a: {dtype: float}
  b: {dtype: float, nullable: true}
  c: {dtype: float, max: 3.0}
  d: {dtype: float}
  e: {dtype: int, min: 0}
  region: {dtype: string, categories: [north, south, east, west]}
  churned: {dtype: bool}
"""


def _writable() -> bool:
    try:
        d = CG / f"mlkit_probe_{os.getpid()}"
        d.mkdir(); d.rmdir()
        return True
    except OSError: return False


pytestmark = pytest.mark.skipif(not _writable(), reason=f"{CG} is not writable (needs root and cgroup v1): no memory cap to test under")


def _frame(n: int, seed: int) -> pl.DataFrame:
    "Seeded data with a few failures: two repeated ids, values above c's max, nulls in b."
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64); ids[[7, n - 3]] = ids[[3, 11]]
    c = rng.normal(0, 1, n).clip(-3, 3); c[[5, n // 2]] = 4.0
    b = pl.Series("b", rng.lognormal(2, 1, n)).scatter(rng.integers(0, n, n // 50), None)
    return pl.DataFrame({"id": ids, "a": rng.normal(0, 1, n), "b": b, "c": c, "d": rng.random(n),
                         "e": rng.poisson(12, n), "region": rng.choice(np.array(["north", "south", "east", "west"]), n),
                         "churned": rng.random(n) < 0.3})


def _run(env: dict, argv: list, cap: int | None, tag: str, tmp: Path) -> tuple[int, str, str, dict]:
    """`(exit code, stdout, stderr, {peak})` of `argv` run in a fresh memory cgroup capped at `cap` (None: no cap),
    which the child joins before its first instruction: all its imports and work are charged (`peak`: the group's, file
    pages included; not `ru_maxrss`: a child keeps its forking parent's, here pytest's ~1.3 GB)."""
    group = CG / f"mlkit_stream_{os.getpid()}_{tag}"
    group.mkdir()
    try:
        if cap:
            (group / "memory.limit_in_bytes").write_text(str(cap))
            if (group / "memory.memsw.limit_in_bytes").exists(): (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        with open(tmp / f"{tag}.out", "w") as out, open(tmp / f"{tag}.err", "w") as err:
            p = subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *map(str, argv)],
                                 env=env, stdout=out, stderr=err)
            p.wait()
        stats = {"peak": int((group / "memory.max_usage_in_bytes").read_text())}
        return p.returncode, (tmp / f"{tag}.out").read_text(), (tmp / f"{tag}.err").read_text(), stats
    finally:
        group.rmdir()


def _same_profile(a: dict, b: dict):
    "Profiles equal, means and deviations to the last bits (the streaming engine sums in another order)."
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    for c, e in b["columns"].items():
        for k in ("mean", "std"):
            if k in e:
                x, y = a["columns"][c].pop(k), e.pop(k)
                assert abs(x - y) <= 1e-12 * abs(y), (c, k, x, y)
    assert a == b


def test_streamed_equals_in_memory(tmp_path):
    "On a file that fits, the streamed check, profile and snapshot equal the in-memory ones (deciles, counts, ids exactly)."
    from mlkit.contracts import check_file
    from mlkit.profiles import profile_file
    from mlkit.snapshots import snapshot_file
    from mlkit.config import load_settings
    f, ct = tmp_path / "small.parquet", tmp_path / "big.contract.yaml"
    _frame(300_000, 1).write_parquet(f); ct.write_text(CONTRACT)
    mem, st = check_file(f, ct, stream=False), check_file(f, ct, stream=True)
    assert st.to_dict() == mem.to_dict() and not mem.passed
    assert {(c.column, c.check): c.failing for c in mem.failures} == {("id", "unique"): 4, ("c", "max"): 2}
    _same_profile(profile_file(f, ct, stream=True), profile_file(f, ct, stream=False))
    s = load_settings(write_project(tmp_path / "p"))
    assert snapshot_file(f, s, stream=True).id == snapshot_file(f, s, stream=False).id


@pytest.fixture
def big(tmp_path):
    f = tmp_path / "big.parquet"
    _frame(ROWS, 2).write_parquet(f, compression="uncompressed", row_group_size=250_000)
    (tmp_path / "big.contract.yaml").write_text(CONTRACT)
    assert f.stat().st_size >= 4 * CAP, f.stat().st_size
    yield tmp_path, f
    f.unlink()


def test_beyond_memory(big, tmp_path):
    "Check, profile and snapshot a file over 4x the memory cap, within it; the same results as in memory without the cap."
    d, f = big
    env = project_env(write_project(tmp_path / "p"))
    env.pop("_RJEM_MALLOC_CONF", None)  # polars' import put its own in this process's environment: a user's shell has none
    ct, out = d / "big.contract.yaml", {}
    for name, args in {"check": ["data", "check", f, "--contract", ct, "--json"],
                       "profile": ["data", "profile", f, "--contract", ct, "--json"],
                       "snapshot": ["data", "snapshot", f, "--json"]}.items():
        rc, so, se, capped = _run(env, [MLKIT, *args], CAP, name, tmp_path)
        assert rc == (1 if name == "check" else 0), (name, rc, se[-2000:])
        assert capped["peak"] <= CAP, (name, capped)
        rc2, so2, se2, free = _run(env, [MLKIT, *args], None, name + "_free", tmp_path)  # in memory: no cap, the file fits here
        assert rc2 == rc, se2[-2000:]
        out[name] = (json.loads(so), json.loads(so2))
        print(f"{name}: capped peak {capped['peak'] >> 20} MB, in memory peak {free['peak'] >> 20} MB (file pages included)")
    assert out["check"][0] == out["check"][1]
    assert {(c["column"], c["check"]): c["failing"] for c in out["check"][0]["checks"] if not c["passed"]} == {("id", "unique"): 4, ("c", "max"): 2}
    _same_profile(*out["profile"])
    (a, b) = out["snapshot"]
    assert a["id"] == b["id"] and a["rows"] == b["rows"] == ROWS
    in_memory = "import sys, mlkit.profiles; mlkit.profiles.profile_file(sys.argv[1], stream=False)"
    rc, *_ = _run(env, [sys.executable, "-c", in_memory, f], CAP, "inmem", tmp_path)  # the cap binds: in memory, killed
    assert rc != 0


def test_a_compressed_parquet_file_is_judged_by_what_it_decodes_to(tmp_path):
    "1M rows of two repeated strings compress to a few KB on disk; in memory they take MBs: streaming is decided on that."
    from mlkit.data import decoded_bytes
    p = tmp_path / "small_on_disk.parquet"
    pl.DataFrame({"tier": ["gold", "silver"] * 500_000, "n": [1] * 1_000_000}).write_parquet(p)
    assert p.stat().st_size < 100_000 and decoded_bytes(p) >= 32_000_000
    assert decoded_bytes(p) >= pl.read_parquet(p).estimated_size()  # a floor on what it really takes
