"""Train a tabular MLP with mlkit.train.fit under torchrun (DDP): `torchrun --nproc_per_node=2 scripts/ddp_train.py OUT`.

Each rank writes the SHA-256 of its final weights and how many epoch callbacks it received to OUT/rank<r>.json, so a
test can check that every rank ends with the same weights and only rank 0 reports. Needs torch only.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mlkit.models import TabularMLP
from mlkit.train import fit, is_main_process, rank, seed_everything

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(size=(2_000, 8)).astype(np.float32)
y = (X[:, 0] - X[:, 3] + 0.5 * X[:, 5] > 0).astype(np.int64)
seed_everything(0)
model = TabularMLP(8, 2, hidden=[32, 32])
calls = []
hist = fit(model, X, y, X, y, epochs=4, batch_size=64, seed=0, device="cpu", progress=False,
           on_epoch=lambda e, m: calls.append(e))
weights = b"".join(v.detach().numpy().tobytes() for _, v in sorted(model.state_dict().items()))
(out / f"rank{rank()}.json").write_text(json.dumps({
    "sha256": hashlib.sha256(weights).hexdigest(), "callbacks": len(calls), "main": is_main_process(),
    "world": torch.distributed.get_world_size(), "val_accuracy": hist[-1]["val_accuracy"]}))
torch.distributed.destroy_process_group()
