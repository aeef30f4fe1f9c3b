"""The test suite's own layout: no test module imports another one (shared helpers live in tests/helpers.py)."""

import ast
import os

TESTS = os.path.dirname(os.path.abspath(__file__))


def imported_modules(source: str) -> set:
    """Top-level names of every module an import statement in `source` names, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_test_module():
    test_modules = {name[:-3] for name in os.listdir(TESTS) if name.startswith("test_") and name.endswith(".py")}
    offenders = {}
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS, name), encoding="utf-8") as fh:
                hits = imported_modules(fh.read()) & test_modules
            if hits:
                offenders[name] = sorted(hits)
    assert offenders == {}, f"import shared helpers from tests/helpers.py instead: {offenders}"


def test_the_check_sees_imports_at_any_depth():
    source = "import os\nfrom test_a import x\ndef f():\n    import test_b.c\n"
    assert imported_modules(source) == {"os", "test_a", "test_b"}
