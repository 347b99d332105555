"""Containers and Kubernetes: `containerize` (the engine asked first; BentoML handed the right Bento), and the manifests
of a real champion and challenger validated offline against the schemas of several Kubernetes versions."""
import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, champion_bento, mlkit, project_env, write_project

K8S_VERSIONS = ("1.30", "1.33", "1.37")  # kubernetes-validate ships 1.25 to 1.37
SENTINEL_KEY = "k8s-test-key-never-in-a-manifest"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "Its own project: penguins version 1 champion (its Bento built), version 2 challenger; two real trainings."
    root = tmp_path_factory.mktemp("k8s")
    ini = write_project(root)
    env = project_env(ini)
    params = REPO / "nbs/train/penguins.yaml"
    mlkit("train", "penguins", "-f", params, env=env, check=True)
    bento = champion_bento(env)  # version 1 promoted and built
    mlkit("train", "penguins", "-f", params, "-p", "seed=1", env=env, check=True)  # version 2: challenger
    mlkit("build", "penguins", "--alias", "challenger", env=env, check=True)  # its image: what the canary runs
    return {"root": root, "ini": ini, "env": env, "bento": bento}


@contextlib.contextmanager
def configured(project, **extra):
    "mlkit configured in this process for the project (plus `extra` variables), the environment restored after."
    import mlkit.config
    saved = dict(os.environ)
    os.environ.clear(); os.environ.update({**project["env"], **extra})
    try: yield mlkit.config.configure()
    finally:
        os.environ.clear(); os.environ.update(saved)
        mlkit.config._configured = None


def docs_of(path) -> dict:
    "The objects of a manifest file by `Kind/name`."
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(Path(path).read_text()) if d}


def validate_all(docs: dict) -> None:
    from kubernetes_validate import validate
    for v in K8S_VERSIONS:
        for d in docs.values(): validate(d, v, strict=True)  # strict: a field the schema does not know fails too


def test_manifests_of_champion_and_challenger_validate(project, tmp_path):
    from kubernetes_validate import ValidationError, validate
    from mlkit.k8s import k8s_manifests
    from mlkit.registry import get_version
    with configured(project, MLKIT_API_KEYS=SENTINEL_KEY) as s:
        r = k8s_manifests("penguins", tmp_path / "k8s", s, registry="registry.example.com/team")
        champ, chall = get_version("penguins", "champion"), get_version("penguins", "challenger")
    text = Path(r["path"]).read_text()
    docs = docs_of(r["path"])
    assert sorted(docs) == ["ConfigMap/penguins-serve", "Deployment/penguins", "Deployment/penguins-canary",
                            "HorizontalPodAutoscaler/penguins", "PodDisruptionBudget/penguins", "Service/penguins"], sorted(docs)
    validate_all(docs)
    broken = json.loads(json.dumps(docs["Deployment/penguins"]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(ValidationError): validate(broken, K8S_VERSIONS[0], strict=True)  # the check can fail
    # what runs: the champion's recorded Bento as the stable track, the challenger's as the canary
    assert champ.tags["mlkit.bento"] == project["bento"] == r["bentos"]["stable"]
    assert r["versions"] == {"stable": str(champ.version), "canary": str(chall.version)} == {"stable": "1", "canary": "2"}
    assert r["bentos"]["canary"] == chall.tags["mlkit.bento"] != r["bentos"]["stable"]
    pods = {t: docs[n]["spec"]["template"] for t, n in (("stable", "Deployment/penguins"), ("canary", "Deployment/penguins-canary"))}
    for track, pod in pods.items():
        c = pod["spec"]["containers"][0]
        assert c["image"] == f"registry.example.com/team/{r['bentos'][track]}" == r["images"][track]
        assert pod["metadata"]["annotations"]["mlkit/bento"] == r["bentos"][track]
        assert pod["metadata"]["labels"]["mlkit/version"] == r["versions"][track]
        assert c["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
        assert (c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"], c["startupProbe"]["httpGet"]) == \
            ({"path": "/livez", "port": "http"}, {"path": "/readyz", "port": "http"}, {"path": "/livez", "port": "http"})
        assert c["env"] == [{"name": "MLKIT_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "penguins-api-keys", "key": "MLKIT_API_KEYS"}}}]
        assert c["envFrom"] == [{"configMapRef": {"name": "penguins-serve"}}]
        assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}  # penguins: no GPU
        assert {k: v for k, v in pod["metadata"]["annotations"].items() if k.startswith("prometheus.io/")} == \
            {"prometheus.io/scrape": "true", "prometheus.io/port": "3000", "prometheus.io/path": "/metrics"}
    # the split: the Service selects both tracks; each Deployment only its own pods; HPA and PDB the stable track
    sel = docs["Service/penguins"]["spec"]["selector"]
    for track, pod in pods.items():
        assert sel.items() <= pod["metadata"]["labels"].items()
        own = docs[f"Deployment/penguins{'' if track == 'stable' else '-canary'}"]["spec"]["selector"]["matchLabels"]
        assert own.items() <= pod["metadata"]["labels"].items()
        assert not own.items() <= pods["canary" if track == "stable" else "stable"]["metadata"]["labels"].items()
    assert docs["HorizontalPodAutoscaler/penguins"]["spec"]["scaleTargetRef"]["name"] == "penguins"
    assert docs["PodDisruptionBudget/penguins"]["spec"]["selector"]["matchLabels"]["mlkit/track"] == "stable"
    # settings travel in the ConfigMap; no key does, anywhere
    data = docs["ConfigMap/penguins-serve"]["data"]
    assert data["MLKIT_SERVE__HOST"] == "0.0.0.0" and data["MLKIT_SERVE__MAX_ROWS"] == str(s.serve.max_rows)
    assert SENTINEL_KEY not in text and not any("API_KEYS" in k for k in data)
    assert not list((tmp_path / "k8s").glob(".*")), "no temp file left beside the manifests"


def test_gpu_and_no_canary(project, tmp_path):
    from mlkit.k8s import k8s_manifests
    out = tmp_path / "k8s"
    with configured(project, MLKIT_SERVE__DEVICE="cuda") as s:
        k8s_manifests("penguins", out, s)  # first with the canary ...
        r = k8s_manifests("penguins", out, s, canary=False, replicas=3, memory="4Gi")  # ... then the same file without
    docs = docs_of(r["path"])
    validate_all(docs)
    assert "Deployment/penguins-canary" not in docs and list(r["versions"]) == ["stable"]
    pod = docs["Deployment/penguins"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": "1"}
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert r["images"]["stable"] == project["bento"]  # no registry: the image as `bentoml containerize` tags it
    assert docs["HorizontalPodAutoscaler/penguins"]["spec"]["minReplicas"] == docs["Deployment/penguins"]["spec"]["replicas"] == 3
    with pytest.raises(ValueError, match="replicas = 0"):
        with configured(project) as s: k8s_manifests("penguins", out, s, replicas=0)


def _bin(folder: Path, **scripts) -> Path:
    "A folder of executable shell scripts `name=body`."
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755 | stat.S_IEXEC)
    return folder


def _no_daemon_path(tmp_path: Path) -> str:
    "A PATH with this machine's `docker` client (no daemon behind it), no podman, and this Python's tools."
    d = tmp_path / "nodaemon"
    d.mkdir()
    real = shutil.which("docker")
    if real: (d / "docker").symlink_to(real)
    else: _bin(d, docker='echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1')
    return f"{d}{os.pathsep}{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin"


def test_containerize_names_the_missing_engine(project, tmp_path):
    from mlkit.k8s import NoContainerEngine, containerize
    with configured(project) as s:
        with pytest.raises(NoContainerEngine) as e:
            containerize(project["bento"], settings=s, env={**os.environ, "PATH": _no_daemon_path(tmp_path)})
        msg = str(e.value)
        assert "\n" not in msg and "docker is there but its daemon does not answer (`docker info` exit" in msg, msg
        assert "no podman command on PATH" in msg, msg
        with pytest.raises(NoContainerEngine, match="no docker command on PATH; no podman command on PATH"):
            containerize(project["bento"], settings=s, env={**os.environ, "PATH": str(_bin(tmp_path / "empty"))})
        with pytest.raises(ValueError, match="not one mlkit build finished"):  # asked before any engine
            containerize("penguins:nosuchbento", settings=s)


def test_containerize_hands_bentoml_the_bento(project, tmp_path):
    "A fake `docker` (Docker cannot run here) that answers `info` and records what BentoML asks it, and the Bento it was given."
    from mlkit.k8s import containerize
    log, got = tmp_path / "argv.log", tmp_path / "context"
    fake = _bin(tmp_path / "fake", docker=f'printf "%s\\n" "$*" >> {log}\n[ "$1" = version ] && echo \'"27.0.0"\'\n'
                                          f'[ "$1" = build ] && cp "$(eval echo \\${{$#}})/bento.yaml" {got}\nexit 0')
    with configured(project) as s:
        image = containerize(project["bento"], "registry.example.com/team", s,
                             env={**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert image == f"registry.example.com/team/{project['bento']}"
    calls = log.read_text().splitlines()
    assert calls[0] == "info", calls
    build = [c for c in calls if c.startswith("build ")]
    assert len(build) == 1 and build[0].startswith(f"build --tag {image} "), calls
    info = yaml.safe_load(got.read_text())  # the build context BentoML gave the engine: the very Bento mlkit finished
    assert f"{info['name']}:{info['version']}" == project["bento"] and info["labels"]["mlkit_complete"]


def test_cli_build_containerize_and_deploy_k8s(project, tmp_path):
    env = {**project["env"], "PATH": _no_daemon_path(tmp_path)}
    r = mlkit("build", "penguins", "--containerize", env=env)
    assert r.returncode == 2 and "daemon does not answer" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = mlkit("deploy", "penguins", "--k8s", tmp_path / "k8s", "--image-prefix", "registry.example.com/team", env=project["env"])
    assert r.returncode == 0, r.stderr
    docs = docs_of(tmp_path / "k8s" / "penguins.yaml")
    validate_all(docs)
    assert docs["Deployment/penguins"]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.example.com/team/penguins:")


def test_manifests_name_the_recorded_images_and_refuse_an_unbuilt_version(project, tmp_path):
    "A teammate without the Bentos gets the images the registry records (never a new build); a version never built is refused."
    from mlkit.k8s import k8s_manifests
    from mlkit.registry import get_version
    with configured(project) as s:
        recorded = {a: get_version("penguins", a).tags["mlkit.bento"] for a in ("champion", "challenger")}
        home = s.bentoml_home
        away = home.with_name("bentoml-away")
        home.rename(away)  # the teammate's BentoML store: empty
        try: r = k8s_manifests("penguins", tmp_path / "k8s", s)
        finally:
            if home.exists(): shutil.rmtree(home)
            away.rename(home)
        assert r["bentos"] == {"stable": recorded["champion"], "canary": recorded["challenger"]}, r
        assert {a: get_version("penguins", a).tags["mlkit.bento"] for a in ("champion", "challenger")} == recorded  # nothing rebuilt
        mv = get_version("penguins", "challenger")
        from mlkit.tracking import mlflow
        client = mlflow(s).MlflowClient()
        client.delete_model_version_tag("penguins", mv.version, "mlkit.bento")
        try:
            with pytest.raises(ValueError, match="has no Bento recorded: build and push its image first"):
                k8s_manifests("penguins", tmp_path / "k8s2", s)
        finally: client.set_model_version_tag("penguins", mv.version, "mlkit.bento", recorded["challenger"])
