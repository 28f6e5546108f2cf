"""herd's import graph has no cycles, and no module imports another herd module's private (``_``) names.

The graph is read from the source with ``ast``, every import counted: also those inside functions, which hide a
cycle from ``import`` but not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "herd"

# Exceptions, each a debt to clear rather than a permission: (importer, imported module) for an import edge,
# (importer, private name) for a private import. None today.
KNOWN: set[tuple[str, str]] = set()


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules(ROOT)


def _imports(module: str, path: Path, modules: dict[str, Path] = MODULES) -> list[tuple[str, str | None, int]]:
    """(imported herd module, name taken from it or None, line) for every import in ``path``, and for every
    ``alias._name`` where ``alias`` is a herd module imported whole."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "herd":
                    found.append((a.name, None, node.lineno))
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "herd":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    found.append((sub, None, node.lineno))
                    aliases[a.asname or a.name] = sub
                else:
                    found.append((base, a.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return found


def _graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _ in _imports(module, path, modules):
            while target not in modules:  # `import herd.x.y` of a name that is no module file
                target = target.rpartition(".")[0]
            # importing herd.a.b runs herd/a/__init__.py first, unless the importer is part of herd.a already
            parts = target.split(".")
            parents = [".".join(parts[:i]) for i in range(2, len(parts))]
            for t in [target] + [p for p in parents if not (module + ".").startswith(p + ".")]:
                if t != module and (module, t) not in KNOWN:
                    graph[module].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _private(modules: dict[str, Path] = MODULES) -> list[str]:
    return [f"{module} (line {line}) imports {name} from {target}"
            for module, path in modules.items() for target, name, line in _imports(module, path, modules)
            if name is not None and name.startswith("_") and target != module and (module, name) not in KNOWN]


def test_no_private_imports_across_modules():
    private = _private()
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_checks_see_every_kind_of_import(tmp_path):
    # checkpoint.load once hid a cycle behind an import inside a function: the walk must see such imports
    files = {"__init__.py": "from herd.pkg import b\n", "pkg/__init__.py": "",
             "pkg/b.py": "def f():\n    from herd import c\n    return c._x\n",
             "c.py": "from . import d\n", "d.py": "from .pkg.b import _z, f\n"}
    for name, text in files.items():
        (tmp_path / "herd" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "herd" / name).write_text(text)
    modules = _modules(tmp_path / "herd")
    graph = _graph(modules)
    assert graph["herd"] == {"herd.pkg", "herd.pkg.b"}  # herd/pkg/__init__.py runs first
    assert graph["herd.pkg.b"] == {"herd.c"}  # `from herd import c`, inside a function
    assert set(_cycle(graph)) == {"herd.c", "herd.d", "herd.pkg.b"}  # relative imports resolved
    assert _private(modules) == ["herd.d (line 1) imports _z from herd.pkg.b",
                                "herd.pkg.b (line 3) imports _x from herd.c"]
    assert "herd.api" in _graph()["herd"]  # herd.__getattr__ imports it lazily
