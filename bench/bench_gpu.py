"""The GPU figures, one prepared script for a machine with CUDA (on one without, it writes a single figure saying so and
measures nothing). About 2 minutes on an H100.

    python bench/bench_gpu.py --out figures.json     # or: python bench/run.py gpu

1. Training: the digits CNN (`SmallCNN(1, 10, [32, 64])` on the 8x8 images inside scikit-learn's wheel, preprocessed by
   `mlkit.tensors`, the training images repeated REPEAT times so an epoch is long enough to time) through
   `mlkit.train.fit` on its defaults on CUDA (bf16 autocast, cosine schedule with warm-up, gradient clipping at 1.0,
   validation each epoch, data on the device) vs a hand-written torch loop doing the same work on the same GPU, in
   ROUNDS alternating rounds after a warm-up round, best of each. Target: >= 0.95x the hand-written loop's images/s.
2. Serving: the trained CNN on the GPU, in-process (no HTTP): 32 requests of one image each, answered one forward pass
   per request (unbatched) vs merged into one forward pass (what the service's adaptive batching does); each request's
   images preprocessed (`FieldSpec.batch`), moved to the device, scored, and the probabilities copied back. Images/s.
Needs torch, numpy and scikit-learn's wheel (for the digits file) beside this checkout's mlkit (`mlkit.train` and
`mlkit.tensors` import with torch alone).
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = int(os.environ.get("MLKIT_BENCH_GPU_EPOCHS", 20))
ROUNDS = int(os.environ.get("MLKIT_BENCH_GPU_ROUNDS", 3))
REPEAT, BATCH, LR, WEIGHT_DECAY, WARMUP, CLIP = 8, 64, 1e-2, 1e-4, 0.05, 1.0  # fit's defaults, written out for the loop


def digits_data():
    "Training and validation image batches (channel-first float32) and labels, as the digits model reads them."
    import numpy as np
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check import digits

    from mlkit.tensors import FieldSpec
    images, labels = digits()
    n = int(len(images) * 0.8)
    field = FieldSpec("image", {"dtype": "image", "size": [8, 8], "channels": 1}).fit(list(images[:n]))
    X, y = field.batch(list(images[:n])), labels[:n]
    return field, images, X.repeat(REPEAT, 1, 1, 1), np.tile(y, REPEAT), field.batch(list(images[n:])), labels[n:]


def cnn():
    from mlkit.models import SmallCNN
    return SmallCNN(1, 10, [32, 64], dropout=0.1)


def raw_loop(X, y, Xv, yv) -> tuple[float, float]:
    "A hand-written bf16 loop on the GPU doing fit's default work; returns (seconds, final epoch loss)."
    import random

    import numpy as np
    import torch
    from torch import nn
    dev = torch.device("cuda")
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    m = cnn().to(dev).train()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = math.ceil(len(y) / BATCH)
    total_steps, warm = EPOCHS * steps, int(WARMUP * EPOCHS * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * min((s - warm) / max(1, total_steps - warm), 1.0))))
    Xt, yt, Xvt, yvt = X.to(dev), torch.from_numpy(y).to(dev), Xv.to(dev), torch.from_numpy(yv).to(dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        total = torch.zeros((), device=dev)
        for idx in torch.randperm(len(yt), generator=gen).to(dev).split(BATCH):
            with torch.autocast("cuda", dtype=torch.bfloat16): loss = nn.functional.cross_entropy(m(Xt[idx]).float(), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        last = total.item() / len(yt)
        m.eval()
        with torch.inference_mode():
            logits = m(Xvt).float()
            nn.functional.cross_entropy(logits, yvt, reduction="sum").item(), (logits.argmax(1) == yvt).sum().item()
        m.train()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, last


def mlkit_loop(X, y, Xv, yv):
    "mlkit.train.fit on its defaults on CUDA; returns (seconds, final epoch loss, the model)."
    import torch

    from mlkit.train import fit, seed_everything
    seed_everything(0)
    m = cnn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hist = fit(m, X, y, Xv, yv, epochs=EPOCHS, device="cuda", progress=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, hist[-1]["train_loss"], m


def served(model, field, images) -> dict:
    "Images/s of 32 one-image requests on the GPU: one forward pass each, and merged into one."
    import torch
    reqs = [list(images[i:i + 1]) for i in range(32)]
    one = lambda: [model(field.batch(r).to("cuda", non_blocking=True)).float().softmax(1).cpu() for r in reqs]
    merged = lambda: model(torch.cat([field.batch(r) for r in reqs]).to("cuda", non_blocking=True)).float().softmax(1).cpu()
    out = {}
    with torch.inference_mode():
        for label, f in (("unbatched", one), ("batched", merged)):
            f()
            best = 0.0
            for _ in range(5):
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < 0.5: f(); n += 1
                best = max(best, 32 * n / (time.perf_counter() - t0))
            out[label] = best
    return out


def main(out: Path):
    import torch
    if not torch.cuda.is_available():
        figs = [{"name": "GPU: digits CNN training (bf16) and serving", "unit": "", "value": None, "baseline": None,
                 "text": "no GPU on this machine", "detail": {"torch": torch.__version__}}]
        out.write_text(json.dumps(figs)); print(json.dumps(figs)); return
    sys.path.insert(0, str(REPO))
    field, images, X, y, Xv, yv = digits_data()
    raw_loop(X, y, Xv, yv); mlkit_loop(X, y, Xv, yv)  # warm-up: cuDNN's choices, the allocator, lazy CUDA init
    raw, mine = [], []
    for _ in range(ROUNDS):
        raw.append(raw_loop(X, y, Xv, yv))
        mine.append(mlkit_loop(X, y, Xv, yv))
    (rs, rl), (ms, ml, model) = min(raw), min(mine, key=lambda r: r[0])
    model.eval()
    s = served(model, field, images)
    gpu, samples = torch.cuda.get_device_name(0), len(y) * EPOCHS
    setup = {"gpu": gpu, "torch": torch.__version__, "images": len(y), "epochs": EPOCHS, "batch_size": BATCH, "rounds": ROUNDS,
             "precision": "bf16 autocast", "schedule": "cosine", "grad_clip": CLIP}
    figs = [{"name": f"GPU ({gpu}): digits CNN training images/s, bf16, fit's defaults", "unit": "images/s",
             "value": samples / ms, "baseline": samples / rs, "baseline_label": "hand-written bf16 torch loop, same GPU",
             "target": {"of": "ratio", "op": ">=", "limit": 0.95},
             "detail": {**setup, "final_loss": {"mlkit": ml, "raw": rl}, "rounds_mlkit_s": [r[0] for r in mine], "rounds_raw_s": [r[0] for r in raw]}},
            {"name": f"GPU ({gpu}): digits CNN served images/s in-process, 32 one-image requests merged vs one pass each",
             "unit": "images/s", "value": s["batched"], "baseline": s["unbatched"], "baseline_label": "one forward pass per request",
             "detail": setup}]
    print(json.dumps(figs, indent=1))
    out.write_text(json.dumps(figs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    main(ap.parse_args().out)
