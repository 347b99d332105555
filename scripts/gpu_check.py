"""Verify mlkit's CUDA training path with torch alone (no polars, MLflow or papermill needed):

    python scripts/gpu_check.py            # on a GPU machine: bf16 autocast, throughput, CPU/GPU agreement
    python scripts/gpu_check.py --cpu-only # anywhere: checks the script and the CPU side

Trains the same seeded TabularMLP on the same synthetic data on CPU (float32) and on CUDA (bf16 autocast), then prints
one JSON line: samples/s on each device, the GPU/CPU speed ratio, final losses, test accuracy on each, and the share
of test rows where the two models agree. Then the digits CNN (`SmallCNN` on the 8x8 images inside scikit-learn's wheel,
read with numpy, preprocessed by `mlkit.tensors`) the same way: training images/s, test accuracy, and served batches
(the preprocessing and forward pass of a request of 1 and of 32 images, the model and the batch on the device) in
images/s, with the agreement of the CPU and GPU predictions. Exit 1 when the GPU result disagrees beyond tolerance.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlkit.models import SmallCNN, TabularMLP  # noqa: E402
from mlkit.tensors import FieldSpec  # noqa: E402
from mlkit.train import evaluate, fit, predict_classes, seed_everything  # noqa: E402


def data(rows: int, features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=(features, 4))
    y = (X @ w + 0.3 * rng.normal(size=(rows, 4))).argmax(1).astype(np.int64)
    n = int(rows * 0.8)
    return X[:n], y[:n], X[n:], y[n:]


def train_on(device: str, Xtr, ytr, Xte, yte, args) -> dict:
    seed_everything(0)
    model = TabularMLP(Xtr.shape[1], 4, hidden=[args.width] * args.depth, dropout=0.0)
    t0 = time.perf_counter()
    hist = fit(model, Xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, lr=3e-3, seed=0, device=device, progress=False)
    if device.startswith("cuda"): torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {"device": device, "samples_per_s": len(Xtr) * args.epochs / secs, "final_loss": hist[-1]["train_loss"],
            "test_accuracy": evaluate(model, Xte, yte)["accuracy"], "pred": predict_classes(model, Xte)}


def digits():
    "The 1,797 digits as 8x8 uint8 pixel arrays (0..255) and labels, read with numpy from scikit-learn's wheel."
    import gzip
    import importlib.util
    path = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f: raw = np.loadtxt(f, delimiter=",")
    order = np.random.default_rng(0).permutation(len(raw))
    return np.rint(raw[order, :64] * 255 / 16).reshape(-1, 8, 8), raw[order, 64].astype(np.int64)


def digits_on(device: str, field: FieldSpec, images, labels, epochs: int) -> dict:
    "Train the digits CNN on `device` (bf16 autocast on CUDA), then time served batches of 1 and 32 images there."
    n = int(len(images) * 0.8)
    X = field.batch(list(images))
    seed_everything(0)
    model = SmallCNN(1, 10, [32, 64], dropout=0.0)
    t0 = time.perf_counter()
    fit(model, X[:n], labels[:n], epochs=epochs, batch_size=64, lr=0.01, seed=0, device=device, progress=False)
    if device.startswith("cuda"): torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model.eval()
    served = {}
    for size in (1, 32):
        reqs = [list(images[i:i + size]) for i in range(0, 512, size)]
        with torch.inference_mode():
            for r in reqs[:4]: model(field.batch(r).to(device))  # warm-up
            t0 = time.perf_counter()
            for r in reqs: model(field.batch(r).to(device, non_blocking=True)).float().cpu()
        served[str(size)] = 512 / (time.perf_counter() - t0)
    pred = predict_classes(model, X[n:])
    return {"device": device, "train_images_per_s": n * epochs / train_s, "test_accuracy": float((pred == labels[n:]).mean()),
            "served_images_per_s": served, "pred": pred}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--digits-epochs", type=int, default=10)
    ap.add_argument("--tolerance", type=float, default=0.02, help="allowed test-accuracy gap between CPU and GPU")
    args = ap.parse_args()
    Xtr, ytr, Xte, yte = data(args.rows, args.features)
    cpu = train_on("cpu", Xtr, ytr, Xte, yte, args)
    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cpu": {k: v for k, v in cpu.items() if k != "pred"}}
    ok = True
    if torch.cuda.is_available() and not args.cpu_only:
        gpu = train_on("cuda", Xtr, ytr, Xte, yte, args)
        agree = float((gpu["pred"] == cpu["pred"]).mean())
        gap = abs(gpu["test_accuracy"] - cpu["test_accuracy"])
        ok = gap <= args.tolerance
        out.update(gpu={k: v for k, v in gpu.items() if k != "pred"}, gpu_name=torch.cuda.get_device_name(0),
                   bf16=torch.cuda.is_bf16_supported(), speedup=gpu["samples_per_s"] / cpu["samples_per_s"],
                   prediction_agreement=agree, accuracy_gap=gap, within_tolerance=ok)
    else:
        out["gpu"] = "no CUDA device: GPU path not run"
    images, labels = digits()
    field = FieldSpec("image", {"dtype": "image", "size": [8, 8], "channels": 1}).fit(list(images[: int(len(images) * 0.8)]))
    dc = digits_on("cpu", field, images, labels, args.digits_epochs)
    out["digits"] = {"cpu": {k: v for k, v in dc.items() if k != "pred"}}
    if torch.cuda.is_available() and not args.cpu_only:
        dg = digits_on("cuda", field, images, labels, args.digits_epochs)
        gap = abs(dg["test_accuracy"] - dc["test_accuracy"])
        ok = ok and gap <= args.tolerance * 2
        out["digits"].update(gpu={k: v for k, v in dg.items() if k != "pred"}, prediction_agreement=float((dg["pred"] == dc["pred"]).mean()),
                             accuracy_gap=gap, train_speedup=dg["train_images_per_s"] / dc["train_images_per_s"])
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
