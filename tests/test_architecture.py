"""The package's shape: imports point down the layers, no import cycle, modules and functions
of readable size, and a wheel that carries every module.

Layers (README "Architecture"): the shared modules ``qinco2/*.py`` at the bottom; the product
lines ``codec/`` and ``ivfpq/`` on them; ``ivfsearch/`` on ``codec/``; ``cli/`` on everything.
``qinco2/__init__.py`` and ``__main__.py`` are the public face and may import any layer.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qinco2"

# what each layer may import from inside qinco2 (besides itself)
ALLOWED = {
    "shared": {"shared"},
    "codec": {"shared"},
    "ivfpq": {"shared"},
    "ivfsearch": {"shared", "codec"},
    "cli": {"shared", "codec", "ivfpq", "ivfsearch"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONGER_MODULES: dict[str, str] = {}    # path -> reason it may exceed MAX_MODULE_LINES
LONGER_FUNCTIONS: dict[str, str] = {}  # "path:function" -> reason


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if module in ("qinco2", "qinco2.__main__"):
        return None                                  # the public face
    if len(parts) >= 2 and (PKG / parts[1]).is_dir():
        return parts[1]
    return "shared"


def _imports(module: str, path: Path) -> set[str]:
    """Every qinco2 module named by an import anywhere in the file (lazy ones included)."""
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qinco2"}
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            if target.split(".")[0] != "qinco2":
                continue
            named = {f"{target}.{a.name}" for a in node.names} & set(_modules())
            found |= named or {target}               # `from . import ivfpq` names a module
    return found


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in _imports(module, path):
            t_layer = _layer(target)
            if t_layer not in (None, layer) and t_layer not in ALLOWED[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({t_layer})")
            if t_layer is None:
                wrong.append(f"{module} imports the public face {target}; import the module itself")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    mods = _modules()
    graph = {m: {t for t in _imports(m, p) if t in mods and t != m} for m, p in mods.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_modules_and_functions_stay_small():
    too_long = []
    for module, path in _modules().items():
        rel = str(path.relative_to(ROOT))
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES and rel not in LONGER_MODULES:
            too_long.append(f"{rel}: {source.count(chr(10))} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONGER_FUNCTIONS:
                    too_long.append(f"{rel}:{node.name}: {n} lines (> {MAX_FUNCTION_LINES})")
    assert not too_long, "split these, or add them with a reason to LONGER_*:\n" + "\n".join(too_long)


def _has_setuptools(major: int) -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= major


def test_wheel_contains_every_module(tmp_path):
    """Build the wheel as users get it (from a copy: a build leaves files beside the sources)
    and compare its files with the source tree."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             "runs", "data", ".pytest_cache"))
    isolation = ["--no-build-isolation"] if _has_setuptools(64) else []   # else pip fetches it
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", *isolation,
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("qinco2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")} | {"qinco2/py.typed"}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    import qinco2
    assert f"qinco2-{qinco2.__version__}.dist-info/METADATA" in names   # the one version number
