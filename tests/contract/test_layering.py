"""The code's shape, checked statically (ast, no imports run):

- imports go downward only: parallel -> data -> models -> checkpoint -> training / inference ->
  entry points and tools; production code never imports the test harness (`testing.py`);
- outside megatron_lite/models/ and tests/, no code compares a value with a model's name or keeps
  an allow-list of objectives: everything dispatches through the model's `ModelSpec`.
"""
import ast
import os

import pytest

from megatron_lite.data.objectives import OBJECTIVES
from megatron_lite.models import model_names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "megatron_lite")

# Layer of each top-level part of the package; a module may import its own part and lower layers.
LAYERS = {"errors": 0, "__init__": 0, "parallel": 1, "data": 2, "models": 3, "checkpoint": 4,
          "training": 5, "inference": 5, "testing": 6}
ENTRY_POINTS_AND_TOOLS = ["pretrain.py", "pretrain_gpt.py", "pretrain_t5.py", "generate.py",
                          "change_mp.py", "tools", "benchmarks"]


def python_files(*paths):
    for path in paths:
        path = os.path.join(ROOT, path)
        if path.endswith(".py"):
            yield path
            continue
        for d, _, names in os.walk(path):
            yield from (os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def imported_modules(path: str):
    """(line, absolute module name) of every import in the file, function-level ones included."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module_name(path) if path.endswith("__init__.py") else \
        module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # `from megatron_lite import testing` imports a module
                yield node.lineno, f"{base}.{alias.name}"


def part(module: str) -> str | None:
    """The package part ('models', 'testing', ...) a megatron_lite module belongs to."""
    bits = module.split(".")
    if bits[0] != "megatron_lite" or len(bits) < 2:
        return None
    return bits[1] if bits[1] in LAYERS else None


def test_package_imports_go_downward_only():
    bad = []
    for path in python_files("megatron_lite"):
        mine = part(module_name(path)) or "__init__"
        for line, module in imported_modules(path):
            theirs = part(module)
            if theirs is None or theirs == mine:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} ({mine}) imports {module} "
                           f"({theirs})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_entry_points_tools_and_benchmarks_do_not_import_the_test_harness():
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {module}"
           for path in python_files(*ENTRY_POINTS_AND_TOOLS)
           for line, module in imported_modules(path) if part(module) == "testing"]
    assert not bad, "\n".join(bad)


def name_comparisons(path: str, names: set[str]):
    """(line, text) of comparisons whose either side is one of `names` as a string literal, or a
    literal collection holding one (`x in ("gpt", "t5")`)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)

    def mentions(node):
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(map(mentions, [node.left, *node.comparators])):
            yield node.lineno, ast.unparse(node)


def test_no_code_outside_the_models_dispatches_on_a_model_or_objective_name():
    names = set(model_names()) | set(OBJECTIVES)
    files = [p for p in python_files("megatron_lite", *ENTRY_POINTS_AND_TOOLS)
             if not p.startswith(os.path.join(PACKAGE, "models") + os.sep)]
    bad = [f"{os.path.relpath(path, ROOT)}:{line}: {text}"
           for path in files for line, text in name_comparisons(path, names)]
    assert not bad, "compare via the ModelSpec instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, found", [
    ('if meta["model"] == "t5":\n    pass', True),
    ('ok = spec.objective not in ("causal_lm", "t5_mixed")', True),
    ('ok = "gpt" != name', True),
    ('ok = spec.generation == "seq2seq"', False),
    ('ok = meta.model != spec.name', False),
])
def test_the_name_check_sees_what_it_should(tmp_path, source, found):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert bool(list(name_comparisons(str(path), {"gpt", "t5", "causal_lm", "t5_mixed"}))) == found
