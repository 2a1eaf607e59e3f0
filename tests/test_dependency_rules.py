"""The package dependency rules (docs/codebase.md), checked on every import statement.

* ``model/`` never imports ``torch.distributed``, ``trainer/``, ``parallel/`` or ``launch/``:
  model code does not know about parallelism;
* ``data/`` never imports ``trainer/``, ``parallel/``, ``model/`` or ``launch/``;
* ``parallel/`` never imports ``trainer/`` or ``launch/``;
* ``serving/`` (the loader of exports) never imports ``trainer/``, ``parallel/``, ``launch/``,
  ``model/`` (the exported program carries the tower), ``torch.distributed``, TorchRec or FBGEMM;
* ``common.py`` (the bottom layer) imports no kunlun module.

Every ``import`` and ``from ... import`` counts, including those inside functions (a lazy
import is still a dependency), and relative imports are resolved to absolute names.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from jobs import REPO

RULES: Dict[str, Tuple[str, ...]] = {
    "model": ("torch.distributed", "kunlun.trainer", "kunlun.parallel", "kunlun.launch"),
    "data": ("kunlun.trainer", "kunlun.parallel", "kunlun.model", "kunlun.launch"),
    "parallel": ("kunlun.trainer", "kunlun.launch"),
    "serving": ("kunlun.trainer", "kunlun.parallel", "kunlun.launch", "kunlun.model", "torch.distributed", "torchrec", "fbgemm_gpu"),
    "common.py": ("kunlun.",),
}


def imported_modules(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``."""
    package = "kunlun." + ".".join(path.relative_to(REPO).parent.parts) if path.parent != REPO else "kunlun"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from torch import distributed`
                yield node.lineno, f"{module}.{alias.name}"


def violations(area: str, forbidden: Tuple[str, ...]) -> List[str]:
    root = REPO / area
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    found = []
    for path in files:
        for line, module in imported_modules(path):
            for prefix in forbidden:
                if module == prefix.rstrip(".") or module.startswith(prefix.rstrip(".") + "."):
                    found.append(f"{path.relative_to(REPO)}:{line}: imports {module} ({area} must not import {prefix})")
    return found


@pytest.mark.parametrize("area", sorted(RULES))
def test_package_dependency_rules(area):
    assert not violations(area, RULES[area]), "\n".join(violations(area, RULES[area]))


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """A rule that cannot fire proves nothing: plant each kind of violation and see it caught."""
    import jobs

    fake = tmp_path / "model" / "towers"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    import torch.distributed as dist\nfrom torch import distributed\nfrom ...trainer import config\n")
    monkeypatch.setattr(jobs, "REPO", tmp_path)
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    found = violations("model", RULES["model"])
    assert len([v for v in found if "torch.distributed" in v]) == 2, found
    assert any("kunlun.trainer" in v and ":4:" in v for v in found), found
