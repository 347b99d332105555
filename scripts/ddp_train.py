"""Train the digits CNN with DDP across processes and machines under torchrun; rank 0 tracks ONE MLflow run.

One machine, two processes:  torchrun --nproc_per_node=2 scripts/ddp_train.py -f nbs/train/digits.yaml
Several machines: the same command on each with --nnodes, --rdzv_backend=c10d and --rdzv_endpoint (see the README).
Parameters are the training notebook's (`nbs/train/digits.ipynb`): `-f FILE.yaml` and `-p key=value` (YAML values).

Rank 0 checks, snapshots, splits and encodes the data (`mlkit.pipeline.prepare`), opens the run and sends the encoded
arrays to the other ranks, so only one process writes to the state folder and the registry. Every rank trains with
`mlkit.train.fit` (DDP: the same weights, a disjoint share of each epoch's rows, `batch_size` rows per rank and step);
rank 0 logs each epoch, then judges, bundles, logs and registers the model (`mlkit.pipeline.finish`). Every rank
hashes its final weights; rank 0 refuses to log a model the ranks disagree on. `--report DIR` writes each rank's hash to
DIR/rank<r>.json (what the test compares).
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mlkit.models import SmallCNN, build_model, model_config
from mlkit.tasks import Task
from mlkit.train import fit, init_distributed, is_main_process, local_rank, rank, seed_everything

NAME = "digits"  # the model: contract nbs/train/digits.contract.yaml, experiment and registered model
DEFAULTS = dict(epochs=30, lr=0.01, weight_decay=1e-4, batch_size=64, widths=[16, 32], dropout=0.1, patience=None,
                seed=0, register=True)  # the notebook's (nbs/train/digits.yaml)
SCRIPT = "scripts/ddp_train.py"  # recorded as the run's source instead of a notebook


def parse_args(argv=None) -> tuple[dict, Path | None]:
    "The training parameters (defaults < `-f` file < `-p` assignments) and the report folder."
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-f", "--parameters", type=Path, help="YAML file of parameters (e.g. nbs/train/digits.yaml)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="one parameter (YAML value)")
    ap.add_argument("--report", type=Path, help="folder for each rank's rank<r>.json (weights SHA-256, run id)")
    a = ap.parse_args(argv)
    params = dict(DEFAULTS)
    if a.parameters: params.update(yaml.safe_load(a.parameters.read_text()) or {})
    for item in a.param:
        key, sep, raw = item.partition("=")
        if not sep: ap.error(f"-p {item!r}: expected KEY=VALUE")
        params[key.strip()] = yaml.safe_load(raw)
    if unknown := sorted(set(params) - set(DEFAULTS)): ap.error(f"unknown parameters {unknown}; valid: {', '.join(DEFAULTS)}")
    return params, a.report


def weights_sha256(module: torch.nn.Module) -> str:
    "SHA-256 over the state dict (names, dtypes, shapes and bytes, in name order): equal on every rank or DDP went wrong."
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        v = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _source(settings) -> Path:
    "The digits as a Parquet file in the state folder, written once (atomically), as the notebook does."
    from mlkit import data
    source = settings.state_dir / "data" / "digits.parquet"
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=source.parent, suffix=".parquet.tmp", delete=False) as tmp:
            data.load_digits().write_parquet(tmp.name)
        Path(tmp.name).replace(source)
    return source


def main(argv=None) -> int:
    params, report = parse_args(argv)
    if torch.cuda.is_available(): torch.cuda.set_device(local_rank())  # NCCL's object collectives use the current device
    if not init_distributed(): sys.exit(f"{SCRIPT}: run it under torchrun (WORLD_SIZE > 1), e.g. torchrun --nproc_per_node=2 {SCRIPT}")
    world, nodes = dist.get_world_size(), int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun: GROUP_WORLD_SIZE = nodes
    p = None
    if is_main_process():  # the only process that reads the source, writes the state folder and talks to MLflow
        import mlkit
        from mlkit import pipeline, tracking
        p = pipeline.prepare(NAME, _source(mlkit.config.configure()), seed=params["seed"])
        print(p.summary(), flush=True)
    shared = [None]
    if p:
        pipeline.track(p, {**params, "world_size": world, "nodes": nodes}, notebook=SCRIPT)
        tracking.mlflow().set_tags({"mlkit.runner": "torchrun", "mlkit.ddp.world_size": str(world), "mlkit.ddp.nodes": str(nodes),
                                    "mlkit.ddp.backend": dist.get_backend()})
        config = model_config(SmallCNN, in_channels=p.tensors.fields[0].n_channels, n_classes=p.task.n_outputs,
                              widths=params["widths"], dropout=params["dropout"])
        shared = [dict(config=config, task=p.task.to_dict(), X=p.X_train, y=p.y_train, X_val=p.X_val, y_val=p.y_val)]
    dist.broadcast_object_list(shared, src=0)  # the encoded arrays, as rank 0 prepared them (a few MB for the digits)
    d = shared[0]
    seed_everything(params["seed"])
    module = build_model(d["config"], allowed=("mlkit",))
    history = fit(module, d["X"], d["y"], d["X_val"], d["y_val"], epochs=params["epochs"], lr=params["lr"],
                  weight_decay=params["weight_decay"], batch_size=params["batch_size"], seed=params["seed"], device=None,
                  loss_fn=Task.from_dict(d["task"]).loss, patience=params["patience"],
                  progress=False, on_epoch=tracking.epoch_logger() if p else None)
    digest = weights_sha256(module)
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    result = [None]
    if p:
        if len(set(digests)) != 1:
            tracking.mlflow().set_tag("mlkit.error", f"ranks ended with different weights: {digests}")
            tracking.end_run("FAILED")
            sys.exit(f"{SCRIPT}: the {world} ranks ended with different weights (SHA-256 {sorted(set(digests))}); no model was logged")
        tracking.mlflow().set_tag("mlkit.ddp.weights_sha256", digest)
        done = pipeline.finish(p, module, d["config"], history, register_version=params["register"])
        print(done.summary(), flush=True)
        result = [dict(run_id=done.run_id, version=done.version.version if done.version else None, metrics=done.metrics)]
    dist.broadcast_object_list(result, src=0)  # every rank waits for rank 0's logging, then knows the run
    if report:
        report.mkdir(parents=True, exist_ok=True)
        (report / f"rank{rank()}.json").write_text(json.dumps({
            "rank": rank(), "world": world, "nodes": nodes, "main": is_main_process(), "sha256": digest,
            "epochs": len(history), "run_id": result[0]["run_id"], "version": result[0]["version"]}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
