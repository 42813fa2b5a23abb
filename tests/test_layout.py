"""The package's shape: no import cycles, data flows down the floors, methods are asked, not named."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_dft"

spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph
spec.loader.exec_module(import_graph)

# The only modules allowed to import mlx_dft.api: the package façade, the CLI, and the recipes
# that run training and evaluation end to end.
ABOVE_API = {"mlx_dft", "mlx_dft.cli", "mlx_dft.evaluation.compare", "mlx_dft.evaluation.run"}
ABOVE_API |= {"mlx_dft.evaluation.sample", "mlx_dft.chat"}


def test_the_import_graph_has_no_cycle():
    g = import_graph.graph()
    assert {"mlx_dft.api", "mlx_dft.models", "mlx_dft.adapters.aligner.layer"} <= set(g)
    assert import_graph.cycles(g) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_the_api_imports_it():
    importers = {m for m, deps in import_graph.graph().items() if "mlx_dft.api" in deps}
    assert importers <= ABOVE_API, importers - ABOVE_API


def test_no_module_outside_adapters_branches_on_a_method_name():
    """Comparisons like ``kind == "aligner"`` or ``adapter in ("lora", "dora")`` belong to the
    adapter methods; everywhere else asks the method."""
    names = r"(lora|dora|full|aligner)"
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']{names}["']|["']{names}["']\s*(==|!=)""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "adapters":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Compare, ast.If, ast.IfExp)) and pattern.search(ast.unparse(node)):
                offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offenders, offenders
