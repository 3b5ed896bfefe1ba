"""The package's layout rules: modules of at most 400 lines, imports without cycles, and docs/architecture.md's
module map naming every module."""

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SOURCE / "hf_moe_cl"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(SOURCE).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules `name` imports (anywhere in it), and the packages that importing them runs."""
    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]).rstrip(".")
                    if node.level else node.module)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            pieces = target.split(".")
            found |= {".".join(pieces[:i]) for i in range(2, len(pieces) + 1)} & set(known)
    return {target for target in found if not name.startswith(target + ".") and target != name}


def test_no_module_is_longer_than_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()
            if len(path.read_text().splitlines()) > 400}
    assert not long, long


def test_the_package_has_no_import_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [name, target])}")
            if target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_architecture_map_names_every_module():
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    for row in re.findall(r"^\| `([\w/]+)/([\w.]+)`, (.*?) \|", text, re.M):  # `folder/a.py`, `b.py`, ...
        named |= {f"{row[0]}/{row[1]}"} | {f"{row[0]}/{extra}" for extra in re.findall(r"`([\w.]+\.py)`", row[2])}
    files = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
             if path.name != "__init__.py" or path.parent == PACKAGE}
    missing = sorted(files - named)
    assert not missing, f"docs/architecture.md's module map lacks {missing}"
