"""elmjax's modules import each other in one direction only: no cycle, counting every import
(module-level and function-local, `import x` and `from x import y`); every module imports on
its own, in any order; and every name imported from elmjax (package, benches, tools, tests)
exists."""
import ast
import importlib
import importlib.util
import os
import pathlib
import random
import subprocess
import sys

import pytest

import elmjax

PACKAGE = "elmjax"
PACKAGE_DIR = pathlib.Path(elmjax.__file__).parent


def package_modules() -> dict[str, pathlib.Path]:
    """elmjax and each module under it (subpackages included) -> its file."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = path
    return modules


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name an ImportFrom names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The elmjax modules that `module` imports anywhere in its file."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):  # every statement, inside functions and classes too
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            # `from elmjax.data import sources`: the module elmjax.data.sources when it is one
            names = [
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            # `import elmjax.data.a.b` imports the deepest module of ours that it names
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE) and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state = {node: 0 for node in graph}  # 0 unvisited, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target, 2) == 1:
                return stack[stack.index(target) :] + [target]
            if state.get(target) == 0:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state[node] == 0:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_checker_sees_local_and_package_relative_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = (
        "def f():\n    from elmjax.data import sources, corpus\n"
        "import elmjax.data.tokenizer as t\nfrom . import pipeline\nfrom .seqio import X\n"
    )
    (tmp_path / "m.py").write_text(source)
    known = {f"elmjax.data.{m}" for m in ("m", "sources", "corpus", "tokenizer", "pipeline", "seqio")}
    assert imports_of("elmjax.data.m", tmp_path / "m.py", known) == known - {"elmjax.data.m"}


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "elmjax.data.sources" in graph and "elmjax.training.loop" in graph
    assert "elmjax.models.openelm.family" in graph["elmjax.models.openelm"]
    cycle = find_cycle(graph)
    if cycle:
        edges = "\n".join(f"  {m}: {', '.join(sorted(graph[m])) or '-'}" for m in sorted(graph))
        pytest.fail(f"import cycle: {' -> '.join(cycle)}\nimports:\n{edges}")


@pytest.mark.parametrize("module", ["token_store", "seqio"])
def test_token_store_and_seqio_use_only_the_source_interface_not_sources(module):
    graph = import_graph()
    assert "elmjax.data.sources" not in graph[f"elmjax.data.{module}"]
    assert "elmjax.data.tokenizer" not in graph[f"elmjax.data.{module}"]
    assert "elmjax.data.tokenizer_choice" not in graph[f"elmjax.data.{module}"]


def test_shared_layers_know_no_family():
    """elmjax/layers and elmjax/kernels never import a family's folder (only the registry)."""
    for module, imported in import_graph().items():
        if module.startswith(("elmjax.layers", "elmjax.kernels", "elmjax.parallel")):
            assert not [m for m in imported if m.startswith("elmjax.models.") and m != "elmjax.models.registry"], module


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_in_any_order(seed):
    """One fresh interpreter imports every module, in a shuffled order."""
    names = sorted(package_modules())
    random.Random(seed).shuffle(names)
    code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % names
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]


def imported_names(path: pathlib.Path):
    """(line, module, name) of every `from elmjax... import name` in the file, function-local
    imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
            for alias in node.names:
                yield node.lineno, node.module, alias.name


@pytest.mark.parametrize("folder", ["elmjax", "bench", "tools", "tests"])
def test_every_name_imported_from_elmjax_exists(folder):
    """Scripts import inside their main(), where a name moved to another module stays hidden
    until someone runs them (bench/olmoe_tpu_dry_run.py did, for several changes)."""
    root = PACKAGE_DIR.parent
    missing = []
    for path in sorted((root / folder).rglob("*.py")):
        for line, module, name in imported_names(path):
            target = importlib.import_module(module)
            is_submodule = hasattr(target, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
            if not hasattr(target, name) and not is_submodule:
                missing.append(f"{path.relative_to(root)}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
