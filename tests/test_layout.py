"""The package's layout: each wing a folder that says what lives in it, and the
import rules docs/layout.md states, checked on the source (no import is run)."""

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kong-plugin" / "kong_oauth2_introspection"
PLUGINS = {"introspection", "client_credentials"}
SHARED = {"kong", "idp", "cache", "server", "ops"}
# The operator's tools that read plugin configs, and the two entry points.
MAY_IMPORT_PLUGINS = {"plugins", "cli", "ops.check", "ops.purge"}


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "schemadata" in path.parts or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Set[str]:
    """Every package module ``name`` imports, at the top or inside a function."""
    here = name.split(".") if name else []
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = ".".join(filter(None, [target, alias.name]))
                out.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "kong_oauth2_introspection"):
            target = node.module[len("kong_oauth2_introspection"):].lstrip(".")
            for alias in node.names:
                sub = ".".join(filter(None, [target, alias.name]))
                out.add(sub if sub in MODULES else target)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _wing(name: str) -> str:
    return name.split(".")[0] if name else ""


def test_every_wing_is_a_folder_whose_init_says_what_lives_there():
    for wing in sorted(SHARED | PLUGINS):
        init = PACKAGE / wing / "__init__.py"
        assert init.is_file(), wing
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, "%s/__init__.py should say what lives there" % wing


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n not in MAY_IMPORT_PLUGINS))
def test_shared_code_never_imports_a_plugin(name):
    own = _wing(name)
    wrong = sorted(t for t in GRAPH[name] if _wing(t) in PLUGINS and _wing(t) != own
                   and t not in PLUGINS)   # a plugin package's __init__ holds only its name
    assert not wrong, "%s imports %s" % (name, ", ".join(wrong))


def test_the_server_imports_no_plugin_internals():
    for name in (n for n in GRAPH if _wing(n) == "server"):
        assert not {t for t in GRAPH[name] if _wing(t) in PLUGINS}, name


def test_no_import_circles():
    state: Dict[str, int] = {}
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH or nxt == "" or node.startswith(nxt + "."):
                continue   # the top-level package, or a module's own package
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
