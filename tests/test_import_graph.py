"""ctmodels' modules import each other without cycles (read from the source by
tools/import_graph.py, deferred imports inside functions included), and the layers
point down: train knows no model, models know nothing of train or jobs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _graph_tool():
    spec = importlib.util.spec_from_file_location(
        "import_graph", ROOT / "tools" / "import_graph.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles():
    tool = _graph_tool()
    graph, _ = tool.imports(ROOT / "ctmodels")
    assert "ctmodels.jobs._jobs" in graph  # the tool reads the package
    assert tool.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The oracle: a package whose two modules import each other (one of them in a
    function) is one cycle."""
    tool = _graph_tool()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("from . import _b\n")
    (pkg / "_b.py").write_text("def f():\n    from ._a import x\n")
    (pkg / "_c.py").write_text("from ._a import y\n")
    graph, _ = tool.imports(pkg)
    assert tool.cycles(graph) == [["pkg._a", "pkg._b"]]


def test_layers_point_down():
    tool = _graph_tool()
    graph, private = tool.imports(ROOT / "ctmodels")

    def reaches(src_prefix, dst_prefix):
        return sorted(
            (m, d) for m, deps in graph.items() if m.startswith(src_prefix)
            for d in deps if d.startswith(dst_prefix)
        )  # fmt: skip

    assert reaches("ctmodels.train", "ctmodels.models") == []
    assert reaches("ctmodels.train", "ctmodels.jobs") == []
    assert reaches("ctmodels.models", "ctmodels.train") == []
    assert reaches("ctmodels.models", "ctmodels.jobs") == []
    # the job layer and the command line use other packages' public names only
    assert [
        p
        for p in private
        if p[0].startswith(
            ("ctmodels.jobs", "ctmodels._cli", "ctmodels.models._predict")
        )
    ] == []
