"""The layering the design promises, read from the source (ast, nothing executed).

Every import of an sd_deploy module by another part of sd_deploy -- at the top of a file
or inside a function -- must be an edge of ALLOWED below. The table is the one in
docs/architecture.md; an edge not in it fails with the file and line that made it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd_deploy"
CAPI_BRIDGE = Path(__file__).resolve().parents[1] / "capi" / "python"

# part -> the parts (or dotted modules) it may import. A part is the first name under
# sd_deploy ("runtime", "engine_dir", ...); a dotted entry allows that module and below.
# Every part may import the package root (sd_deploy.__version__) and itself.
LEAVES = {"engine_dir", "errors", "metrics"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "metrics": set(),
    "engine_dir": {"errors"},
    "models": {"engine_dir", "errors"},
    "exporter": {"models", *LEAVES},
    # The TensorRT version and GPU a plan is tied to are read with the same CUDA wrapper
    # the runtime runs plans with: one copy of that library boundary, not two.
    "engines": {*LEAVES, "runtime.backends.tensorrt_cuda"},
    "runtime": {"engine_dir", "errors"},
    # Wrappers of the runtime's public API only (sd_deploy.runtime itself, no submodule).
    "serving": {"runtime", *LEAVES},
    # sd-bench runs everything side by side, and implements Backends of its own (PyTorch,
    # diffusers) on the runtime's backend seam.
    "benchmarks": {"models", "exporter", "runtime", "runtime.backends", *LEAVES},
    "cli": {"models", "exporter", "engines", "runtime", "serving", "benchmarks", *LEAVES},
    "data": set(),
}
# Edges that must name the module exactly: serving may use `sd_deploy.runtime`, never
# `sd_deploy.runtime.pipeline` or the backends behind it.
EXACT = {("serving", "runtime")}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every sd_deploy import in a file, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(path, node.module, node.level)
            # `from sd_deploy.engine_dir import shapes` depends on the module
            # sd_deploy.engine_dir.shapes; `from sd_deploy.errors import UserError` on
            # sd_deploy.errors.
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.append((node.lineno, child if is_module(child) else module))
    return [(line, name) for line, name in found if name.split(".")[0] == "sd_deploy"]


def absolute(path: Path, module: str | None, level: int) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if not level:
        return module or ""
    # Relative imports start from the file's package (a package's __init__ is in it too).
    parts = ["sd_deploy", *path.relative_to(PACKAGE).with_suffix("").parts][:-1]
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel).is_dir()


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def violations(part: str, path: Path) -> list[str]:
    bad = []
    allowed = ALLOWED[part]
    for line, name in imported_modules(path):
        if name == "sd_deploy" or not is_module(name):
            continue  # the root (__version__), or not a module of ours
        target = name.split(".")[1:]
        if target[0] == part:
            continue
        dotted = ".".join(target)
        ok = any(
            dotted == rule or (dotted.startswith(rule + ".") and (part, rule) not in EXACT)
            for rule in allowed
        )
        if not ok:
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {part} -> {dotted}")
    return bad


def test_every_part_is_in_the_table():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED"


def test_imports_follow_the_allowed_edges():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part != "__init__":
            bad += violations(part, path)
    assert not bad, "imports outside the layering table:\n" + "\n".join(bad)


def test_the_c_bridge_uses_only_the_public_runtime_api():
    bridges = sorted(CAPI_BRIDGE.glob("*.py"))
    if not bridges:
        pytest.skip(f"no C ABI bridge in {CAPI_BRIDGE}")
    bad = [
        f"{path.name}:{line}: {name}"
        for path in bridges
        for line, name in imported_modules(path)
        if is_module(name) and name not in ("sd_deploy.runtime", "sd_deploy.errors")
    ]
    assert not bad, bad


def test_the_checker_catches_a_forbidden_edge(tmp_path, monkeypatch):
    """Mutation check: the runtime importing the exporter is reported with file and line."""
    fake = tmp_path / "sd_deploy"
    (fake / "runtime").mkdir(parents=True)
    (fake / "exporter").mkdir()
    (fake / "exporter" / "export.py").write_text("")
    source = fake / "runtime" / "pipeline.py"
    source.write_text("import numpy\n\ndef f():\n    from sd_deploy.exporter import export\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = violations("runtime", source)
    assert found == ["sd_deploy/runtime/pipeline.py:4: runtime -> exporter.export"]
