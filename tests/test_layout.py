"""The package's structure: every module of the installed ``offseg_hf`` imports, its import graph (module- and
function-level imports alike) has no cycle, nothing in it imports the checkout's ``benchmarks/`` or ``research/``
tools, and the model files (what a saved folder ships as remote code) import only each other and libraries."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import offseg_hf

PACKAGE_DIR = Path(offseg_hf.__file__).resolve().parent
CHECKOUT_TOOLS = ("benchmarks", "research")


def _module_name(path: Path) -> str:
    parts = ["offseg_hf", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``name`` imports, at any depth of its code (``from a import b`` counts as
    ``a.b`` when that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_walk_sees_the_whole_package():
    for area in ("models", "data", "inference", "evaluation", "training", "conversion", "cli"):
        assert f"offseg_hf.{area}" in MODULES
    assert len(MODULES) > 40


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    if name == "offseg_hf.inference.demo":
        pytest.importorskip("gradio")  # the optional demo extra (its own tests say what it needs)
    importlib.import_module(name)


def test_no_module_imports_a_benchmark_or_research_tool():
    offenders = {name: sorted(i for i in imported if i.split(".")[0] in CHECKOUT_TOOLS)
                 for name, imported in GRAPH.items()}
    assert not {name: tools for name, tools in offenders.items() if tools}


def test_no_import_cycles():
    internal = {name: {i for i in imported if i in MODULES and i != name} for name, imported in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(internal[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(internal):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_model_files_import_only_each_other_and_libraries():
    """``save_pretrained`` copies a model file and the files it imports relatively; an import of another part of
    offseg_hf would break a folder loaded with ``trust_remote_code=True`` where offseg_hf is not installed."""
    for name, imported in GRAPH.items():
        if name.startswith("offseg_hf.models.") and name != "offseg_hf.models":
            own = {i for i in imported if i.split(".")[0] == "offseg_hf"}
            assert {i.rpartition(".")[0] for i in own} <= {"offseg_hf.models"}, (name, own)
            source = MODULES[name].read_text(encoding="utf-8")
            assert "from offseg_hf" not in source.replace(">>> from offseg_hf", ""), name  # relative imports only


def test_importing_the_cli_loads_no_model_and_no_torch():
    import subprocess
    import sys

    code = "import sys, offseg_hf.cli; print(sorted(m for m in ('torch', 'transformers', 'offseg_hf.models') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.strip() == "[]"


def test_importing_a_model_class_registers_the_auto_classes():
    import subprocess
    import sys

    code = ("from offseg_hf import SegNextConfig\nfrom transformers import AutoConfig\n"
            "print(type(AutoConfig.for_model('offseg')).__name__, type(AutoConfig.for_model('segnext')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.split() == ["OffSegConfig", "SegNextConfig"]
