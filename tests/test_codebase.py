"""The code's own shape: imports form a DAG that points infra -> train -> model, and nothing read from disk
can run code (no pickle, marshal, shelve, eval, exec or unsafe YAML loaders)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "train", "infra")
LAYER = {"model": 0, "train": 1, "infra": 2}  # a module may import its own layer and the ones below


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in it (function-level imports included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {n for n in names if n in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: imported(tree, set(trees)) - {name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (depth-first search), or None."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_imports_form_a_dag(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_from_infra_to_train_to_model(graph):
    upward = [(a, b) for a, deps in graph.items() for b in deps if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert upward == [], upward


def test_the_check_finds_a_cycle_through_a_function_level_import():
    tree = ast.parse("def f():\n    from train.step import x\n")
    assert imported(tree, {"train.step"}) == {"train.step"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
YAML_SAFE = {"safe_load", "safe_dump", "safe_load_all", "YAMLError"}


def unsafe_uses(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in UNSAFE_CALLS:
            found.append(f"{node.func.id}()")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "yaml" and node.attr not in YAML_SAFE:
                found.append(f"yaml.{node.attr}")
            if node.value.id in UNSAFE_MODULES:
                found.append(f"{node.value.id}.{node.attr}")
            if node.attr == "load" and node.value.id in ("np", "numpy"):
                found.append("np.load (allow_pickle must stay off)")
    return found


def test_nothing_read_from_disk_can_run_code():
    found = {name: uses for name, tree in modules().items() if (uses := unsafe_uses(tree))}
    # np.load of plain arrays: the teacher's top-K shards and the prepared data's lengths and token counts.
    readers = {"train.teacher": 1, "train.data.prepare": 2, "train.data.reader": 1}
    assert found == {name: ["np.load (allow_pickle must stay off)"] * n for name, n in readers.items()}
    for name in readers:
        assert "allow_pickle=True" not in (ROOT / (name.replace(".", "/") + ".py")).read_text()


@pytest.mark.parametrize("snippet, expected", [
    ("import pickle", ["pickle"]), ("from marshal import loads", ["marshal"]), ("eval(x)", ["eval()"]),
    ("yaml.load(f, Loader=yaml.Loader)", ["yaml.load", "yaml.Loader"]), ("yaml.unsafe_load(f)", ["yaml.unsafe_load"]),
    ("exec(code)", ["exec()"]), ("import shelve", ["shelve"]), ("yaml.safe_load(f)", []),
])
def test_the_safety_check_catches_each_unsafe_form(snippet, expected):
    assert unsafe_uses(ast.parse(snippet)) == expected
