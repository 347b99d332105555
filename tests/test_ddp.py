"""Distributed training through torchrun on CPU (gloo): two ranks end with equal weights; only rank 0 reports."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_two_ranks_end_with_equal_weights(tmp_path):
    from mlkit.deploy import free_port
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                        str(REPO / "scripts" / "ddp_train.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["sha256"] == r1["sha256"]
    assert (r0["main"], r0["callbacks"]) == (True, 4) and (r1["main"], r1["callbacks"]) == (False, 0)
    assert r0["val_accuracy"] > 0.9
