"""The digits CNN trained by torchrun across two "nodes" on this machine (two launchers, c10d rendezvous on 127.0.0.1, two
gloo processes each): every rank ends with the same weights, and MLflow holds exactly one run with the model."""
import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import REPO, project_env, write_project
from conftest import mlkit as mlkit_cli

SCRIPT = REPO / "scripts" / "ddp_train.py"


def torchrun(node: int, port: int, rdzv_id: str, *args) -> list[str]:
    "One node's launcher: 2 nodes of 2 processes, meeting at the c10d rendezvous on 127.0.0.1:`port`."
    return [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}", "--local_addr=127.0.0.1",
            "--max_restarts=0", str(SCRIPT), *map(str, args)]


def script():
    "scripts/ddp_train.py as a module (its `weights_sha256`)."
    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_nodes_of_two_ranks_train_one_model_and_log_one_run(tmp_path, clean_environ):
    from mlkit.deploy import free_port
    ini = write_project(tmp_path / "project")
    env, report = project_env(ini), tmp_path / "ranks"
    # 16 rows a rank and step: 4 ranks take the steps of one process at the notebook's 64
    args = ["-f", REPO / "nbs/train/digits.yaml", "-p", "batch_size=16", "--report", report]
    port, rdzv = free_port(), uuid.uuid4().hex[:12]
    nodes = [subprocess.Popen(torchrun(i, port, rdzv, *args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try: logs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None: n.kill(); n.wait()
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(log[-4000:] for log in logs)

    ranks = sorted((json.loads(f.read_text()) for f in report.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and {(r["world"], r["nodes"], r["epochs"]) for r in ranks} == {(4, 2, 4)}
    assert [r["main"] for r in ranks] == [True, False, False, False]
    assert len({r["sha256"] for r in ranks}) == 1, ranks  # the same weights, buffers included, on every rank
    assert len({r["run_id"] for r in ranks}) == 1 and ranks[0]["version"] == 1, ranks

    import os

    import mlkit.config
    from mlkit.models import load_bundle
    from mlkit.registry import download_bundle
    from mlkit.tracking import mlflow
    os.environ.clear(); os.environ.update(env)
    settings = mlkit.config.configure()
    assert settings.tracking_uri.startswith("sqlite:///") and str(tmp_path) in settings.tracking_uri
    client = mlflow(settings).MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]  # rank 0 alone tracked
    run = runs[0]
    assert run.info.run_id == ranks[0]["run_id"] and run.info.status == "FINISHED"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert (p["world_size"], p["nodes"], p["batch_size"], p["epochs"]) == ("4", "2", "16", "4"), p
    assert t["mlkit.runner"] == "torchrun" and t["mlkit.ddp.backend"] == "gloo" and t["mlkit.notebook"] == "scripts/ddp_train.py"
    assert t["mlkit.ddp.weights_sha256"] == ranks[0]["sha256"] and t["mlkit.loadback"] == "passed"
    steps = lambda k: [h.step for h in client.get_metric_history(run.info.run_id, k)]
    assert steps("train_loss") == [1, 2, 3, 4]  # one value an epoch: one process logged them
    assert steps("val_loss") == steps("val_accuracy") == [1, 2, 3, 4, 5]  # and the kept weights', after the last epoch
    assert m["test_accuracy"] >= 0.8, m  # 4 small epochs learn the digits
    # the registered model is the weights every rank ended with
    path, version = download_bundle("digits", alias="challenger")
    assert version.run_id == run.info.run_id
    assert script().weights_sha256(load_bundle(path).module) == ranks[0]["sha256"]
    r = mlkit_cli("reproduce", run.info.run_id, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "trained by torchrun" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr  # not a notebook


UNEVEN = '''
import hashlib, json, sys
import numpy as np, torch
from torch import nn
from mlkit.train import fit, rank, seed_everything
rng = np.random.default_rng(0)
X = rng.normal(size=(1169, 6)).astype(np.float32)  # 1169 rows over 2 ranks: 585 and 584, and 584 is 8 x 73
y = (X[:, 0] + X[:, 2] > 0).astype(np.int64)
seed_everything(0)
model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
hist = fit(model, X, y, X[:200], y[:200], epochs=3, batch_size=73, seed=0, device="cpu", progress=False, patience=2)
w = b"".join(v.detach().numpy().tobytes() for _, v in sorted(model.state_dict().items()))
open(f"{sys.argv[1]}/rank{rank()}.json", "w").write(json.dumps({"sha256": hashlib.sha256(w).hexdigest(),
                                                                  "val_loss": [h["val_loss"] for h in hist]}))
'''


def test_uneven_shares_do_not_hang_and_batchnorm_agrees(tmp_path):
    "Rows that do not split evenly over the ranks (one rank a step more) and BatchNorm: fit neither hangs nor drifts apart."
    from mlkit.deploy import free_port
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0 == r1  # the same weights and BatchNorm statistics, and the same validation each epoch (early stopping agrees)
