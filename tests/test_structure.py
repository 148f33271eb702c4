"""The package's shape, read from its source: the core path follows the reading order of minidiff/__init__.py (each
module imports only the modules before it, and the plumbing and fast paths below it), nothing anywhere imports in a
circle, the core path stays short, and listing minidiff/ shows the core path and the subpackages only."""
import ast
from pathlib import Path

import minidiff

SRC = Path(__file__).resolve().parents[1] / "minidiff"
SUBPACKAGES = {"conditioning", "evaluation", "utils", "fast"}
BELOW = ("utils", "fast")                      # what the core path may use besides earlier core modules


def module_name(path):
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path):
    """The minidiff modules a file imports (relative imports resolved; `from .x import y` counts y when it is a
    module), wherever the import statement stands (inside functions too)."""
    name = module_name(path)
    parts = name.split(".") if name else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (SRC / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (SRC / Path(*sub.split("."))).is_dir() else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minidiff"):
            found.add(node.module.removeprefix("minidiff").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("minidiff.") for a in node.names if a.name.startswith("minidiff.")}
    return {m for m in found if m and m != name}


def graph():
    files = [p for p in SRC.rglob("*.py")]
    return {module_name(p): imports(p) for p in files}


def test_the_core_path_follows_the_reading_order():
    order = minidiff.CORE_PATH
    g = graph()
    for i, name in enumerate(order):
        allowed = set(order[:i])
        bad = {m for m in g[name] if m not in allowed and m.split(".")[0] not in BELOW}
        assert not bad, f"{name}.py imports {sorted(bad)}, which come after it in the reading order or are not below it"


def test_no_import_circle_anywhere():
    g = graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in g.get(node, ()):
            dep = dep if dep in g else dep.rsplit(".", 1)[0]      # `from .pkg import name` of a package's attribute
            if state.get(dep) == "open":
                raise AssertionError(f"import circle: {' -> '.join(stack[stack.index(dep):] + [dep])}")
            if dep in g and dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_the_core_path_is_short_and_the_listing_shows_it():
    lines = {name: len((SRC / f"{name}.py").read_text(encoding="utf-8").splitlines()) for name in minidiff.CORE_PATH}
    assert max(lines.values()) <= 410 and sum(lines.values()) <= 2275, lines
    listed = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
              if not p.name.startswith((".", "__pycache__")) and (p.suffix == ".py" or p.is_dir())}
    assert listed == set(minidiff.CORE_PATH) | SUBPACKAGES | {"__init__"}, listed
