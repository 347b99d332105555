"""Training-loop overhead on the default path: mlkit.train.fit (cosine schedule with warm-up, gradient clipping at 1.0,
validation every epoch, the progress bar, per-epoch MLflow logging into a real SQLite store) vs a hand-written torch loop.

Both train the same model (TabularMLP 32 -> 128 -> 128 -> 4, dropout 0.1) on the same seeded data (ROWS training rows,
VAL_ROWS validation rows) for EPOCHS epochs with fit's default batch size (64), learning rate, weight decay, warm-up share
and clipping, the same seed and torch threads, in the same process, in ROUNDS alternating rounds. The hand-written loop is
what a careful engineer writes without mlkit: AdamW, a LambdaLR cosine-with-warm-up lambda written inline,
`clip_grad_norm_`, the epoch loss summed on the device (one sync per epoch), a validation pass under `inference_mode`
each epoch, and no logging at all (so mlkit's logging, progress bar and bookkeeping are all counted as its overhead).
Figures: samples/s, best of the rounds each (target >= 0.95x the hand-written loop; the median ratio and every round in
the detail), and the absolute difference of the final training loss (target: equal to 1e-6).
Env knobs for quick runs: MLKIT_BENCH_LOOP_ROUNDS, MLKIT_BENCH_LOOP_EPOCHS, MLKIT_BENCH_LOOP_ROWS.
"""
import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

ROWS = int(os.environ.get("MLKIT_BENCH_LOOP_ROWS", 20_000))
EPOCHS = int(os.environ.get("MLKIT_BENCH_LOOP_EPOCHS", 20))
ROUNDS = int(os.environ.get("MLKIT_BENCH_LOOP_ROUNDS", 5))
VAL_ROWS, FEATURES, CLASSES, THREADS = 5_000, 32, 4, 1
BATCH, LR, WEIGHT_DECAY, WARMUP, CLIP = 64, 1e-2, 1e-4, 0.05, 1.0  # fit's defaults, written out for the hand-written loop


def data():
    import numpy as np
    rng = np.random.default_rng(0)
    X = rng.normal(size=(ROWS + VAL_ROWS, FEATURES)).astype(np.float32)
    y = (X[:, :CLASSES].argmax(1) + (X[:, 5] > 1.5)).clip(0, CLASSES - 1).astype(np.int64)
    return X[:ROWS], y[:ROWS], X[ROWS:], y[ROWS:]


def model():
    from mlkit.models import TabularMLP
    return TabularMLP(FEATURES, CLASSES, hidden=[128, 128], dropout=0.1)


def raw_loop(X, y, Xv, yv) -> tuple[float, float]:
    "The loop a careful engineer writes by hand, doing fit's default work; returns (seconds, final epoch loss)."
    import random

    import numpy as np
    import torch
    from torch import nn
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    m = model().train()
    torch.manual_seed(0)  # as fit does: dropout's draws start from the seed whatever building the model drew
    gen = torch.Generator().manual_seed(0)  # the batch order's own generator, as fit has
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = math.ceil(ROWS / BATCH)
    total_steps, warm = EPOCHS * steps, int(WARMUP * EPOCHS * steps)
    cosine = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min((s - warm) / max(1, total_steps - warm), 1.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    Xt, yt, Xvt, yvt = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(Xv), torch.from_numpy(yv)
    history = []
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        total = torch.zeros(())
        for idx in torch.randperm(len(Xt), generator=gen).split(BATCH):
            loss = nn.functional.cross_entropy(m(Xt[idx]).float(), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        last = total.item() / len(Xt)
        m.eval()
        with torch.inference_mode():
            logits = m(Xvt).float()
            history.append((nn.functional.cross_entropy(logits, yvt, reduction="sum").item() / len(yvt), (logits.argmax(1) == yvt).sum().item() / len(yvt)))
        m.train()
    return time.perf_counter() - t0, last


def mlkit_loop(X, y, Xv, yv) -> tuple[float, float]:
    "mlkit.train.fit on its defaults with validation data and per-epoch MLflow logging into a run; returns (seconds, final epoch loss)."
    from mlkit import tracking
    from mlkit.train import fit, seed_everything
    seed_everything(0)
    m = model()
    mlf = tracking.mlflow()
    with mlf.start_run(experiment_id=tracking.experiment_id("bench-loop")):
        t0 = time.perf_counter()
        hist = fit(m, X, y, Xv, yv, epochs=EPOCHS, device="cpu", on_epoch=tracking.epoch_logger())
        secs = time.perf_counter() - t0
    return secs, hist[-1]["train_loss"]


def main(out: Path):
    import torch
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as d:
        os.environ["MLKIT_SETTINGS"] = str(Path(d) / "settings.ini")
        (Path(d) / "settings.ini").write_text("[project]\nstate_dir = state\n")
        import mlkit.config
        s = mlkit.config.configure()
        assert s.tracking_uri.startswith("sqlite:"), s.tracking_uri  # a real SQLite MLflow store
        X, y, Xv, yv = data()
        raw, mine = [], []
        for i in range(ROUNDS):  # alternate, each going first in turn, so a noisy neighbour slows both alike; keep each one's best
            for run in ((raw_loop, raw), (mlkit_loop, mine))[:: 1 if i % 2 == 0 else -1]: run[1].append(run[0](X, y, Xv, yv))
    (rs, rl), (ms, ml) = min(raw), min(mine)
    samples = ROWS * EPOCHS
    per_round = [r[0] / m[0] for r, m in zip(raw, mine)]
    setup = {"rows": ROWS, "val_rows": VAL_ROWS, "epochs": EPOCHS, "batch_size": BATCH, "threads": THREADS, "rounds": ROUNDS,
             "schedule": "cosine", "warmup": WARMUP, "grad_clip": CLIP, "store": "sqlite"}
    figs = [{"name": f"fit loop samples/s, default path ({EPOCHS} epochs, cosine, clipping, validation, MLflow logging each epoch)",
             "unit": "samples/s", "value": samples / ms, "baseline": samples / rs, "baseline_label": "hand-written torch loop",
             "target": {"of": "ratio", "op": ">=", "limit": 0.95},
             "detail": {**setup, "median_ratio": statistics.median(per_round), "rounds_mlkit_s": [m[0] for m in mine],
                        "rounds_raw_s": [r[0] for r in raw]}},
            {"name": "final training loss, absolute difference mlkit vs hand-written", "unit": "", "value": abs(ml - rl),
             "baseline": None, "detail": {"mlkit": ml, "raw": rl}, "target": {"of": "value", "op": "<=", "limit": 1e-6}}]
    print(json.dumps(figs, indent=1))
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    main(ap.parse_args().out)
