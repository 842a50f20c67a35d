"""The package's layering, as docs/training.md promises it: parallel/ owns every collective and
names no kind; train/ holds no torch.distributed call; train/ has no import circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from distributed_sae.sae.registry import kinds

PKG = Path(__file__).resolve().parents[1] / "distributed_sae"


def _strings_and_imports(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    docs = {id(body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and (body := node.body) and isinstance(body[0], ast.Expr)}  # prose, not code
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and id(n) not in docs}
    imports = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            imports.add(n.module)
        elif isinstance(n, ast.Import):
            imports.update(a.name for a in n.names)
    return strings, imports


def test_parallel_names_no_kind():
    for path in sorted((PKG / "parallel").glob("*.py")):
        strings, _ = _strings_and_imports(path)
        named = sorted(set(kinds()) & strings)
        assert not named, f"{path.name} names kinds {named}: a kind's math belongs in sae/"


def test_train_and_sae_hold_no_collective():
    for sub in ("train", "sae"):
        for path in sorted((PKG / sub).glob("*.py")):
            _, imports = _strings_and_imports(path)
            assert not {m for m in imports if m.startswith("torch.distributed")}, path.name
            code = path.read_text()
            assert not re.search(r"(^|[^a-z_.])dist\.[a-z_]+\(", code), path.name


def test_no_import_circle_among_train_files():
    graph = {}
    for path in sorted((PKG / "train").glob("*.py")):
        _, imports = _strings_and_imports(path)
        graph[path.stem] = {m.rsplit(".", 1)[-1] for m in imports
                            if m.startswith("distributed_sae.train.")}

    def reaches(start: str, node: str, seen: set[str]) -> bool:
        for nxt in graph.get(node, ()):
            if nxt == start or (nxt not in seen and reaches(start, nxt, seen | {nxt})):
                return True
        return False

    circles = [m for m in graph if reaches(m, m, {m})]
    assert not circles, f"train/ modules in an import circle: {circles}"
