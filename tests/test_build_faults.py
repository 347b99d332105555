"""Builds killed anywhere (issue 19): a `kill -9` of `mlkit build` at its crash point, while `pip wheel` runs and at a
random point while `bentoml build` runs leaves no process running, no Bento that anything takes for the model's, and
nothing the next build does not remove; serving, `deploy` and `--with-challenger` take only Bentos mlkit finished, and a
model with no recorded bundle hash is refused where it is loaded. Real `mlkit` processes, a real BentoML store, real
`bentoml serve`, the process tree seen through psutil."""
import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, MLKIT, REPO, mlkit, project_env, write_project

pytestmark = pytest.mark.serve

ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
       "body_mass_g": 5000, "sex": "female"}
GONE_BOUND = 60  # s: a killed build's processes are gone well within this (the supervisor kills its group at once;
# frozen by SIGSTOP, none can end by finishing its work)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project of its own (its temp folder too; its state in `.mlkit/`, the default): penguins trained, promoted and built once."
    root = tmp_path_factory.mktemp("buildfaults")
    ini = write_project(root)
    ini.write_text(ini.read_text().replace("state_dir = state\n", "state_dir = .mlkit\n"))  # BentoML refuses hidden build folders
    env = {**project_env(ini), "TMPDIR": str(root / "tmp")}
    (root / "tmp").mkdir()
    mlkit("train", "penguins", "-f", REPO / "nbs/train/penguins.yaml", env=env, check=True)
    mlkit("models", "promote", "penguins", env=env, check=True)
    good = mlkit("build", "penguins", env=env, check=True).stdout.strip().splitlines()[-1]
    home = root / ".mlkit" / "bentoml"
    return {"root": root, "env": env, "home": home, "tool_env": {**env, "BENTOML_HOME": str(home)}, "good": good}


def _bentos(home: Path) -> dict:
    "Tag -> the mlkit store reader's view of each stored Bento."
    from mlkit.bento import bentoml_bentos
    return {b["tag"]: b for b in bentoml_bentos(home)}


def _bentoml_list(p: dict) -> set:
    "The Bento tags `bentoml list` itself shows (it fails on a half-written Bento)."
    r = subprocess.run([str(BIN / "bentoml"), "list", "-o", "json"], env=p["tool_env"], capture_output=True, text=True, check=True)
    return {b["tag"] for b in json.loads(r.stdout)}


def _leftovers(p: dict) -> list[str]:
    "Build folders, build contexts and bundle copies anywhere under the project (its temp folder, its state)."
    found = [q for pat in ("mlkit-build-*", "mlkit-bento-*", "mlkit-bundle-*", "bentoml_bento_*", "bentoml-model-*") for q in p["root"].rglob(pat)]
    builds = p["home"] / "mlkit-builds"
    return sorted(map(str, found + ([d for d in builds.iterdir() if d.is_dir()] if builds.is_dir() else [])))


def _build_processes(root: Path) -> list:
    "`bentoml build` and `pip wheel` processes working for this project."
    out = []
    for q in psutil.process_iter(["cmdline"]):
        cmd = " ".join(q.info["cmdline"] or [])
        if str(root) in cmd and ("bentoml build" in cmd or "pip wheel" in cmd): out.append(cmd[:200])
    return out


def _kill_build(env: dict, args: list, when: str | None, delay: float = 0.0) -> tuple[int, list, str]:
    """`mlkit build ARGS`; `delay` s after a process whose command line holds `when` runs under it (the command, not
    mlkit's supervisor of it), that process and its own are frozen (SIGSTOP: they cannot finish on their own, only be
    killed) and mlkit alone gets SIGKILL (`when` None: it runs to its end). Returns mlkit's exit code, every process seen
    under it (those still running: the caller's to stop), its stderr."""
    proc = subprocess.Popen([MLKIT, "build", *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, hit = {}, None
    try:
        while proc.poll() is None:
            try: tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error: tree = []
            for c in tree:
                seen[c.pid] = c
                try:
                    cmd = " ".join(c.cmdline())
                    if hit is None and when and when in cmd and "prctl" not in cmd: hit = (time.monotonic(), c)  # not the supervisor
                except psutil.Error: pass
            if hit is not None and time.monotonic() - hit[0] >= delay:
                try:
                    for c in [hit[1], *hit[1].children(recursive=True)]: c.suspend()
                except psutil.Error: pass  # it ended first: nothing left to freeze
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None: proc.kill()
    return proc.returncode, list(seen.values()), err


def _gone(seen: list) -> list:
    "Those of `seen` still running after a while (then killed, so no test leaves them behind)."
    _, alive = psutil.wait_procs(seen, timeout=GONE_BOUND)
    for a in alive:
        try: a.kill()
        except psutil.Error: pass
    return [a.pid for a in alive]


def _assert_nothing_taken(p: dict, before: set):
    "No new Bento (or only finished ones), BentoML's `latest` one mlkit finished, and `bentoml list` agrees."
    bentos = _bentos(p["home"])
    assert all(b["finished"] for b in bentos.values()), {t: b for t, b in bentos.items() if not b["finished"]}
    assert set(bentos) >= before
    latest = (p["home"] / "bentos" / "penguins" / "latest").read_text().strip()
    assert bentos[f"penguins:{latest}"]["finished"], latest
    assert _bentoml_list(p) == set(bentos)


KILLS = {"fault": (None, 0.0), "pip": ("pip wheel", 0.3), "bentoml": ("bentoml build", None)}


@pytest.mark.parametrize("point", list(KILLS))
def test_a_killed_build_leaves_nothing_the_next_one_keeps(project, point):
    "kill -9 of mlkit build: its children die with it, no Bento is taken as the model's, the next build cleans up and succeeds."
    p, seed = project, random.randrange(10**6)
    when, delay = KILLS[point]
    delay = random.Random(seed).uniform(0.0, 1.0) if delay is None else delay  # a random point while bentoml build runs
    env = {**p["env"], "MLKIT_FAULT": "build"} if point == "fault" else p["env"]
    before = set(_bentos(p["home"]))
    rc, seen, err = _kill_build(env, ["penguins"], when, delay)
    ctx = f"{point} (seed {seed}, delay {delay:.2f} s)"
    assert rc == -signal.SIGKILL, (ctx, rc, err[-2000:])
    assert not _gone(seen) and not _build_processes(p["root"]), (ctx, _build_processes(p["root"]))
    _assert_nothing_taken(p, before)
    assert _leftovers(p), ctx  # what the killed build left, for the next one to remove
    r = mlkit("build", "penguins", env=p["env"], check=True)
    tag = r.stdout.strip().splitlines()[-1]
    assert _leftovers(p) == [], (ctx, _leftovers(p))
    bentos = _bentos(p["home"])
    assert bentos[tag]["finished"] and set(bentos) == before | {tag}, (ctx, tag, sorted(bentos))
    assert (p["home"] / "bentos" / "penguins" / "latest").read_text().strip() == tag.split(":")[1]
    _assert_nothing_taken(p, before)


def _plant_stray(home: Path, good: str) -> str:
    """The Bento a build killed before this fix left: a copy of `good`, newer, without the mark, and BentoML's `latest`."""
    import yaml
    name, version = good.split(":")
    src, stray = home / "bentos" / name / version, "zzstray" + version[7:]
    shutil.copytree(src, home / "bentos" / name / stray)
    f = home / "bentos" / name / stray / "bento.yaml"
    info = yaml.safe_load(f.read_text())
    info["version"], info["creation_time"] = stray, "2999-01-01T00:00:00+00:00"
    info["labels"].pop("mlkit_complete")
    f.write_text(yaml.safe_dump(info, sort_keys=False))
    (home / "bentos" / name / "latest").write_text(stray)
    return f"{name}:{stray}"


def _serve(args: list, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def test_serving_takes_only_bentos_mlkit_finished(project, tmp_path, clean_environ):
    """A Bento without the mark, BentoML's `latest`: `mlkit serve --bento` and `deploy` refuse it in one line naming it,
    `NAME:latest` is the newest Bento mlkit finished, `bentoml serve` of it answers 503 not_started, and `mlkit serve`
    serves the good Bento."""
    import os

    from mlkit.config import configure
    from mlkit.demo import post_json
    from mlkit.deploy import check_bento, deploy, free_port, stop_service, wait_ready
    p = project
    good = max((b for b in _bentos(p["home"]).values() if b["finished"]), key=lambda b: b["created"])["tag"]
    stray = _plant_stray(p["home"], good)
    r = mlkit("serve", "penguins", "--bento", stray, "--port", free_port(), env=p["env"], timeout=120)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert stray in r.stderr and "no mlkit_complete label" in r.stderr, r.stderr
    os.environ.clear(); os.environ.update(p["env"])
    s = configure()
    assert check_bento("penguins:latest", "penguins", s) == good and check_bento("penguins", "penguins", s) == good
    with pytest.raises(ValueError, match=f"Bento {stray} is not one mlkit build finished for 'penguins'"): deploy("penguins", stray, settings=s)
    with pytest.raises(ValueError, match="it is not in the BentoML store"): check_bento("penguins:nothing", "penguins", s)
    with pytest.raises(ValueError, match="built for model 'penguins'"): check_bento(good, "diabetes", s)
    port = free_port()
    by_hand = _serve([str(BIN / "bentoml"), "serve", stray, "--host", "127.0.0.1", "--port", str(port)], p["tool_env"], tmp_path / "stray.log")
    try:
        with pytest.raises(RuntimeError, match="cannot start: .*no mlkit_complete label"): wait_ready(f"http://127.0.0.1:{port}", by_hand, timeout=180)
    finally: stop_service(by_hand)
    port, log = free_port(), tmp_path / "serve.log"
    served = _serve([MLKIT, "serve", "penguins", "--bento", "penguins:latest", "--port", str(port)], p["env"], log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", served, timeout=180)
        status, body = post_json(f"http://127.0.0.1:{port}/predict", {"rows": [ROW]})[:2]
        assert status == 200 and body["version"] == "1", body
    finally: stop_service(served)
    assert log.read_text().splitlines()[0].startswith(f"serving {good} on "), log.read_text()[:500]
    shutil.rmtree(p["home"] / "bentos" / "penguins" / stray.split(":")[1])
    (p["home"] / "bentos" / "penguins" / "latest").write_text(good.split(":")[1])


def _unlabel(home: Path, tag: str) -> Path:
    "Remove the bundle hash label from a stored BentoML model's model.yaml (the metadata keeps its copy); returns the file."
    f = home / "models" / tag.replace(":", "/") / "model.yaml"
    lines = f.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.startswith("  mlkit_bundle_sha256:")]
    assert len(kept) == len(lines) - 1, f.read_text()
    f.write_text("".join(kept))
    return f


def test_with_challenger_and_deploy_follow_the_same_rules(project):
    """`--with-challenger` killed at its crash point leaves nothing; built, its Bento records both bundle hashes and
    deploys; a challenger model whose hash label is gone stops `mlkit deploy` (503 not_started, one line), and the next
    build imports it again."""
    p = project
    code = ("from mlkit.config import configure; configure()\nfrom mlkit.registry import get_version, register\n"
            "v = get_version('penguins', version='1')\nprint(register(v.source, 'penguins', v.run_id, v.tags['mlkit.bundle_sha256']).version)\n")
    assert subprocess.run([str(BIN / "python"), "-c", code], env=p["env"], capture_output=True, text=True, check=True).stdout.strip() == "2"
    before = set(_bentos(p["home"]))
    rc, seen, err = _kill_build({**p["env"], "MLKIT_FAULT": "build"}, ["penguins", "--with-challenger"], None)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert not _gone(seen) and not _build_processes(p["root"])
    _assert_nothing_taken(p, before)
    assert set(_bentos(p["home"])) == before and _leftovers(p)
    tag = mlkit("build", "penguins", "--with-challenger", env=p["env"], check=True).stdout.strip().splitlines()[-1]
    assert _leftovers(p) == []
    import yaml
    labels = yaml.safe_load((p["home"] / "bentos" / tag.replace(":", "/") / "bento.yaml").read_text())["labels"]
    sha = labels["champion_sha256"]
    assert labels["mlkit_complete"] and labels["challenger_model"] == f"penguins_v2-{sha[7:15]}" and labels["challenger_sha256"] == sha, labels
    from mlkit.deploy import free_port
    port = free_port()
    try:
        r = mlkit("deploy", "penguins", "--port", port, env=p["env"], check=True, timeout=300)
        assert f"({tag}) serves on http://127.0.0.1:{port}" in r.stdout, r.stdout
        mlkit("deploy", "penguins", "--stop", env=p["env"], check=True)
        f = _unlabel(p["home"], f"penguins:v2-{sha[7:15]}")
        r = mlkit("deploy", "penguins", "--port", port, env=p["env"], timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
        assert "cannot start" in r.stderr and f"penguins:v2-{sha[7:15]}: its bundle hash is missing" in r.stderr, r.stderr
        r = mlkit("build", "penguins", "--with-challenger", env=p["env"], check=True)
        assert f"penguins:v2-{sha[7:15]} is incomplete or differs from its bundle" in r.stderr, r.stderr
        assert f"mlkit_bundle_sha256: {sha}" in f.read_text()
    finally:
        mlkit("deploy", "penguins", "--stop", env=p["env"])
