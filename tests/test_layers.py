"""The layout's promises: imports flow down the layers without cycles, the service does not need the demo, and CI
does not silently skip the real data."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from markerless.cli import main

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


# transport/daemon above the localizer above the store: a module imports from its own layer or below
LAYERS = {"cli": 5, "demo": 4, "service": 3, "pipeline": 2, "models": 1, "scene": 1}


def _module_imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, at its top or inside functions."""
    files = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (SRC / "markerless").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_imports_flow_down_the_layers_without_cycles() -> None:
    graph = _module_imports()
    assert len(graph) > 80
    upward = [(m, d) for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert upward == []
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []


def test_service_pipeline_and_scene_do_not_import_the_demo() -> None:
    """Importing every module of the three layers pulls neither `markerless.demo` nor the demo extra's packages."""
    script = (
        "import importlib, pkgutil, sys\n"
        "import markerless.service, markerless.pipeline, markerless.scene\n"
        "names = [m.name for pkg in (markerless.service, markerless.pipeline, markerless.scene)\n"
        "         for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert len(names) > 20, names\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'amqtt', 'psutil')\n"
        "                      or m.startswith('markerless.demo'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_demo_without_its_extra_prints_a_hint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "amqtt" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["markerless demo: needs the demo extra (amqtt missing): pip install 'markerless[demo]'"]
    assert not (tmp_path / "out").exists()


def test_ci_run_fails_without_the_kitchen_scan_in_ci(tmp_path: Path) -> None:
    """With CI=true a missing scan is an error of the setup (exit 1, says what is missing), not skipped tests."""
    env = {**os.environ, "CI": "true", "MARKERLESS_KITCHEN_DIR": str(tmp_path / "no-kitchen")}
    done = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{tmp_path / 'no-kitchen'}/kitchen-poly.zip is missing" in done.stderr
