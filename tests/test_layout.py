"""The library's architecture holds: one notebook per module, modules and export cells that fit in a reader's head,
imports that run one way (a module imports only modules numbered before it), `cli` imported by nothing, and a
`Predictor` that loads without BentoML or a web stack. (`mlkit.core.moved` resolves a deprecated name in its new
module by name, when old code asks for it: that lookup is not an import of the module holding the shim.)"""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

LIB, NBS = REPO / "mlkit", REPO / "nbs"
MAX_MODULE_LINES, MAX_EXPORT_CELL_LINES = 400, 60


def modules() -> dict[str, int]:
    "Every exported module -> the number of the notebook it comes from (`nbs/NN_name.ipynb`)."
    out = {}
    for f in sorted(LIB.glob("*.py")):
        m = re.search(r"File to edit: \.\./nbs/(\d+)_\w+\.ipynb", f.read_text())
        if m: out[f.stem] = int(m.group(1))
    return out


def imported(path: Path) -> set[str]:
    "The mlkit modules a module imports, at module level or inside a function."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlkit.")}
        elif isinstance(node, ast.ImportFrom):  # nbdev writes `from mlkit.x import` as `from .x import`
            mod = node.module or ""
            if node.level == 1: mod = f"mlkit.{mod}" if mod else "mlkit"
            elif node.level: continue
            if mod == "mlkit": out |= {a.name for a in node.names if (LIB / f"{a.name}.py").exists()}
            elif mod.startswith("mlkit."): out.add(mod.split(".")[1])
    return out


def module_graph() -> dict[str, list[str]]:
    "Each module -> the mlkit modules it imports, in notebook order (printed by `python tests/test_layout.py`)."
    order = modules()
    return {m: sorted(imported(LIB / f"{m}.py"), key=order.get) for m in sorted(order, key=order.get)}


def notebooks() -> list[Path]:
    return sorted(NBS.glob("[0-9]*.ipynb"))


def cells(nb: Path) -> list[dict]:
    return [{"type": c["cell_type"], "src": "".join(c["source"])} for c in json.loads(nb.read_text())["cells"]]


def test_every_module_comes_from_one_notebook_and_says_its_job_first():
    order = modules()
    assert len(order) == len(notebooks()) == len(set(order.values())), (order, notebooks())
    for m in order:
        doc = ast.get_docstring(ast.parse((LIB / f"{m}.py").read_text()))
        assert doc and len(doc) > 20, f"mlkit/{m}.py: its first line must say what it is for"


@pytest.mark.parametrize("path", sorted(p.name for p in LIB.glob("*.py") if p.name != "_modidx.py"))
def test_no_module_is_over_400_lines(path):
    n = len((LIB / path).read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"mlkit/{path}: {n} lines; split it along a seam (at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("nb", [p.name for p in notebooks()])
def test_notebooks_read_like_nbdev_own(nb):
    cs = cells(NBS / nb)
    title, exp = cs[0]["src"].splitlines(), re.match(r"#\| default_exp (\w+)", cs[1]["src"])
    assert cs[0]["type"] == "markdown" and title[0].startswith("# ") and title[1].startswith("> "), f"{nb}: opens with '# name' and '> why'"
    assert exp and exp.group(1).lstrip("_") == nb.split("_", 1)[1].removesuffix(".ipynb").lstrip("_"), f"{nb}: default_exp names the module after the number"
    exports = [i for i, c in enumerate(cs) if c["type"] == "code" and c["src"].startswith("#| export")]
    for i in exports:
        n = len(cs[i]["src"].splitlines()) - 1
        assert n <= MAX_EXPORT_CELL_LINES, f"{nb}: export cell {i} has {n} lines (at most {MAX_EXPORT_CELL_LINES})"
    for i in exports[1:]:  # after the imports cell: prose before each export cell, never straight after an example
        j = i - 1
        while cs[j]["type"] == "code" and cs[j]["src"].startswith("#| export"): j -= 1
        assert cs[j]["type"] == "markdown", f"{nb}: export cell {i} follows a code cell without a markdown cell saying why"


def test_imports_run_one_way():
    order = modules()
    for m, deps in module_graph().items():
        upward = [d for d in deps if order[d] >= order[m] and d != m]
        assert not upward, f"mlkit/{m}.py (notebook {order[m]:02d}) imports {upward}, which come after it"


def test_nothing_imports_cli():
    users = [str(p.relative_to(REPO)) for p in [*LIB.glob("*.py"), *REPO.glob("bentos/*/*.py")]
             if p.name not in ("cli.py", "_modidx.py") and "cli" in imported(p)]
    assert not users, users


def test_predictor_imports_no_web_stack():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mlkit.predictor"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in loaded and "mlkit" in loaded  # the check sees imports at all
    assert not loaded & {"bentoml", "uvicorn", "starlette", "fastapi", "circus"}, loaded & {"bentoml", "uvicorn", "starlette"}


if __name__ == "__main__":
    for m, deps in module_graph().items(): print(f"{modules()[m]:02d} {m:<13} <- {', '.join(deps) or '(nothing of mlkit)'}")
