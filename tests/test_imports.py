"""The package's modules import one way (public API -> autograd Functions | registered ops -> implementation ->
kernels | fallback): no import cycle, counting imports inside functions too (they run as late as a call, but a
cycle through them is still a two-way dependency)."""

import ast
import pathlib

import nanfuse

ROOTS = {"nanfuse": pathlib.Path(nanfuse.__file__).parent,
         "nanfuse.kernels": pathlib.Path(nanfuse.__file__).parent.parent / "kernels"}  # package-dir in pyproject


def _modules():
    """{module name: source path} of every module of the package, nanfuse.kernels included."""
    found = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([prefix, *parts])
            if not name.startswith("nanfuse.kernels") or prefix == "nanfuse.kernels":
                found[name] = path
    return found


def _imports(name, path, modules):
    """The package's modules that `name` imports anywhere in its source (a `from package import x` counts as
    an import of package.x where that is a module, else of the package)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    # a submodule's import of its own parent package only reads the package already being imported
    return {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert {"nanfuse._ops", "nanfuse._cross_entropy_impl", "nanfuse.kernels.cross_entropy"} <= set(graph)
    assert "nanfuse._cross_entropy_impl" in graph["nanfuse._ops"]  # the parser sees the imports it must see
    assert "nanfuse.kernels.cross_entropy" in graph["nanfuse._cross_entropy_impl"]  # (inside a function)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
