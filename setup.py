"""setuptools hook (everything else is in pyproject.toml): a wheel built from a git checkout records the commit it was
built from in `mlkit/_source.json`, so a Bento built by a `pip install`ed mlkit can still say which code it packs
(`mlkit.bento._mlkit_commit`). The file is written into the build folder only, never into the source tree."""
import json
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _commit() -> str:
    "HEAD of the checkout holding this file, `-dirty` when tracked files changed; empty outside git."
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode: return ""
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


class BuildPy(build_py):
    def run(self):
        super().run()
        out = Path(self.build_lib) / "mlkit" / "_source.json"
        if out.parent.is_dir(): out.write_text(json.dumps({"format": 1, "commit": _commit()}) + "\n")


setup(cmdclass={"build_py": BuildPy})
