"""The package's layout: no import cycles, and no module takes another's private names.

Read from the source with ``ast`` (nothing is imported): every ``import`` counts,
also those inside functions, since a lazy import that goes back up is a cycle that
only waits for the right call order to bite.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "nnmark"
# Package-private modules that the package shares inside itself by design (DESIGN.md
# layout): the extension loader, the array adapters, the float64 reference ops, and the
# scoped torch thread count for small work.
SHARED_PRIVATE_MODULES = {"nnmark._ext", "nnmark._arrays", "nnmark._reference", "nnmark._threads", "nnmark._display",
                          "nnmark._C_cpu", "nnmark._C_cuda"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(current: str, level: int, module: str | None) -> str:
    base = current.split(".") if _is_package(current) else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str):
    """(imported module, names taken from it, line) for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "nnmark" or a.name.startswith("nnmark."):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.level, node.module) if node.level else (node.module or "")
            if not (target == "nnmark" or target.startswith("nnmark.")):
                continue
            names = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES or sub in SHARED_PRIVATE_MODULES:
                    yield sub, [], node.lineno  # "from . import ops": the submodule
                else:
                    names.append(a.name)
            if names:
                yield target, names, node.lineno


def _graph() -> dict[str, set[str]]:
    g = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            if target in MODULES and target != m:
                g[m].add(target)
    return g


def test_every_module_is_found():
    assert {"nnmark", "nnmark.checkpoints", "nnmark.scan", "nnmark.scan.engine", "nnmark.whitebox",
            "nnmark.blackbox", "nnmark.verdicts"} <= set(MODULES)


def test_no_import_cycles():
    g = _graph()
    # The package's __init__ imports everything; a module importing the package root
    # ("from . import verify", "from .. import attacks") would close a cycle through it.
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = []
    for m in MODULES:
        for target, names, line in _imports(m):
            if target == m:
                continue
            last = target.rsplit(".", 1)[-1]
            own_package = target.rsplit(".", 1)[0] == m.rsplit(".", 1)[0] or target.startswith(m + ".")
            if last.startswith("_") and not last.startswith("__") and target not in SHARED_PRIVATE_MODULES \
                    and not own_package:
                bad.append(f"{m}:{line} imports private module {target}")
            bad += [f"{m}:{line} takes {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_private_attributes_of_other_modules():
    """``mod._name`` where ``mod`` is another nnmark module bound by an import."""
    bad = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = _resolve(m, node.level, node.module)
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        bound[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                if node.attr.startswith("_") and not node.attr.startswith("__") \
                        and bound[node.value.id] not in SHARED_PRIVATE_MODULES:
                    bad.append(f"{m}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("fn", ["verify", "extract", "calibrate", "scan"])
def test_entry_points_take_options_by_keyword_and_document_them(fn):
    import inspect

    import nnmark

    f = getattr(nnmark, fn)
    params = list(inspect.signature(f).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) == 2, f"{fn}{inspect.signature(f)}: options after the first two must be keyword-only"
    assert "device" in inspect.signature(f).parameters
    doc = inspect.getdoc(f)
    assert "Args:" in doc and "Returns:" in doc
    for p in params:
        assert f"{p.name}:" in doc, f"{fn}: argument {p.name!r} is not documented under Args"


def test_one_version():
    """pyproject.toml's version is the package's (certificates record nnmark.__version__)."""
    import re

    import nnmark

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == nnmark.__version__
