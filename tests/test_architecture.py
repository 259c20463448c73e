"""The package's shape: layers that import downward only, no import cycle, no cross-module
private names, intra-package imports at the top of each file, and a light ``--help``.

The layers (``python/semisam_o1/<layer>/``), lowest first: core, data, methods, stages,
pipeline; then the entry points api, cli, __main__ and the package's ``__init__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "semisam_o1"
LAYERS = ("core", "data", "methods", "stages", "pipeline", "api", "cli", "__main__", "__init__")
HEAVY = ("torch", "monai", "onnxruntime", "ray", "nibabel", "SimpleITK", "ants", "matplotlib", "scipy")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[ast.ImportFrom, str, list[str], bool]]:
    """(node, imported module, names, at the top) for each import of a semisam_o1 module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(path.relative_to(PKG).parts[:-node.level])
                mod = ".".join(x for x in (base, node.module or "") if x)
            elif (node.module or "").split(".")[0] == "semisam_o1":
                mod = node.module[len("semisam_o1"):].lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            out.append((node, mod, names, id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("semisam_o1."):
                    out.append((node, a.name[len("semisam_o1."):], [], id(node) in top))
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for _, mod, names, _ in _imports(path):
            for target in [f"{mod}.{n}" if mod else n for n in names] + [mod]:
                if target in MODULES and target != m:
                    graph[m].add(target)
                    break
    return graph


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0] if module else "__init__")


def test_no_import_cycle():
    graph = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_downward_only():
    bad = [f"{m} imports {n}" for m, targets in _edges().items() for n in targets
           if m and _layer(n) > _layer(m) and m != "__main__"]
    bad = [b for b in bad if not b.startswith("__init__")]
    assert not bad, bad


def test_intra_package_imports_at_the_top():
    """Only the compiled extensions (ImportError when the package was not built) are imported late."""
    late = [f"{m}:{node.lineno} {mod}" for m, path in MODULES.items()
            for node, mod, names, top in _imports(path)
            if not top and not set(names) <= {"_core", "_core_cuda"}]
    assert not late, late


def test_no_private_name_imported_across_modules():
    bad = [f"{m}: {n} from {mod}" for m, path in MODULES.items()
           for _, mod, names, _ in _imports(path) for n in names
           if n.startswith("_") and not n.startswith("__") and n not in ("_core", "_core_cuda")]
    assert not bad, bad


def test_one_definition_of_each_public_constant():
    """An UPPER_CASE constant is defined in one module (NIFTI_ENDINGS was defined twice)."""
    seen: dict[str, str] = {}
    dup = []
    for m, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.isupper() and t.id not in ("SETTINGS", "STAGE"):
                        if t.id in seen:
                            dup.append(f"{t.id}: {seen[t.id]} and {m}")
                        seen[t.id] = m
    assert not dup, dup


def test_help_imports_no_heavy_package():
    code = ("import sys, contextlib, io\n"
            "from semisam_o1 import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "    for c in cli.COMMANDS:\n"
            "        try:\n            cli.main([c, '--help'])\n        except SystemExit:\n            pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_api_functions_are_plain_functions():
    import types

    import semisam_o1

    assert isinstance(semisam_o1.run, types.FunctionType)
    assert isinstance(semisam_o1.predict, types.FunctionType)
    assert semisam_o1.run.__module__ == "semisam_o1.api"


def test_every_public_list_names_what_its_module_defines():
    """``from semisam_o1.<module> import *`` works everywhere (a stale ``__all__`` raised)."""
    import importlib

    stale = []
    for name in MODULES:
        if name in ("__main__", "") or name.endswith("__init__"):
            continue
        module = importlib.import_module(f"semisam_o1.{name}")
        stale += [f"{name}.{n}" for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not stale, stale
