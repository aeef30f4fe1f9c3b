"""beam_job's import graph (scripts/import_graph.py): no circles, no import up the layers, every module in a layer."""

import importlib.util
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "import_graph.py")


def _load():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(textwrap.dedent(text))


def test_the_package_has_no_import_circles_and_no_upward_imports():
    graph_tool = _load()
    graph = graph_tool.build_graph(ROOT)
    assert "beam_job.delg.loader" in graph and "beam_job.schemas.delg_v1" in graph
    assert graph_tool.cycles(graph) == []
    assert graph_tool.upward_imports(graph) == []
    assert graph_tool.unlayered(graph) == []


def test_function_level_and_relative_imports_make_circles_and_upward_imports(tmp_path):
    _tree(str(tmp_path), {
        "beam_job/__init__.py": "",
        "beam_job/config.py": "def f():\n    from beam_job.delg import model\n",  # base -> delg, in a function
        "beam_job/delg/__init__.py": "",
        "beam_job/delg/model.py": "from . import cache\nfrom beam_job.config import f\n",
        "beam_job/delg/cache.py": "def g():\n    from .model import X\n",  # model <-> cache, relative
        "beam_job/pipeline/__init__.py": "VALUE = 1\n",
        "beam_job/pipeline/step.py": "from beam_job.pipeline import VALUE\nimport beam_job.delg.cache\n",
        "beam_job/extra.py": "",
    })
    graph_tool = _load()
    graph = graph_tool.build_graph(str(tmp_path))
    assert {d for d, _ in graph["beam_job.pipeline.step"]} == {"beam_job.pipeline", "beam_job.delg.cache"}
    assert graph_tool.cycles(graph) == [["beam_job.config", "beam_job.delg.cache", "beam_job.delg.model"]]
    assert graph_tool.upward_imports(graph) == [("beam_job.config", 2, "beam_job.delg.model")]
    assert graph_tool.unlayered(graph) == ["beam_job.extra"]
    run = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "circle: beam_job.config <-> beam_job.delg.cache <-> beam_job.delg.model" in run.stdout
    assert "upward: beam_job.config:2 imports beam_job.delg.model (base -> delg)" in run.stdout
    assert "no layer: beam_job.extra" in run.stdout
